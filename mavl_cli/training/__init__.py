"""mavl_cli.training."""
