"""What every process exports about itself: Prometheus metrics."""
