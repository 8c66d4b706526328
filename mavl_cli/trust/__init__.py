"""mavl_cli.trust."""
