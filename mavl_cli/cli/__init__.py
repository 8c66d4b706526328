"""mavl_cli.cli."""
