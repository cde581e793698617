"""What a run reports: the cost of a training step and of inference (metrics), the results dict it writes
(results), what the numbers depend on besides the code (environment), memory units (units)."""
