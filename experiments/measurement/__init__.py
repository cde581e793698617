"""What a run reports about cost: FLOPs, memory and time of a training step and of inference."""
