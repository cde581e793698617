"""The training loop's infrastructure: checkpoints, stop signals, data parallelism, hardware, logging, errors."""
