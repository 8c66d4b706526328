"""mavl_cli.reports."""
