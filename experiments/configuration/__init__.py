"""The config schema (configuration.schema): the type and allowed values of every setting."""
