"""mavl_cli.explain."""
