"""Everything Hydra-facing: builds model, data and method from a config, trains, measures, logs."""
