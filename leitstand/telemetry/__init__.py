"""What the service tells its operators: log lines on stdout and metrics for Prometheus."""
