"""What people read: terminal tables and views of stage results, HTML reports, plots, model cards."""
