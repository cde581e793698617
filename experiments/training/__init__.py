"""The training loop's infrastructure: checkpoints, stop signals, LR schedules, data parallelism, hardware,
logging, errors."""
