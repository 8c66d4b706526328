"""mavl_cli.io."""
