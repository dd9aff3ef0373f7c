"""Configuration: YAML with line numbers, a strict schema, secret references, cross-checks."""

from relay.config.errors import ConfigError, ConfigErrors
from relay.config.load import load_config

__all__ = ["ConfigError", "ConfigErrors", "load_config"]
