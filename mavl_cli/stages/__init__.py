"""mavl_cli.stages."""
