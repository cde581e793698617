"""On-device measurements: `python -m device.latency` times training steps and inference per method."""
