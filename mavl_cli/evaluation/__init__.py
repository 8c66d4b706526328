"""mavl_cli.evaluation."""
