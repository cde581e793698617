"""The config's schema (configuration.schema: types, allowed values, one-line errors), its Literal options
(configuration.choices) and settings as command-line overrides (configuration.overrides)."""
