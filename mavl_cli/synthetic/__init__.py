"""mavl_cli.synthetic."""
