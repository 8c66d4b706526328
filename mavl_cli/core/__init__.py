"""mavl_cli.core."""
