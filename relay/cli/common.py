"""What several `relay` subcommands share: loading the configuration with its errors printed,
and ages for people (relay.config.units.format_age)."""

from __future__ import annotations

import sys

from relay.config import ConfigErrors, load_config
from relay.config.model import Config
from relay.config.units import format_age as age


def load_or_report(path: str | None) -> Config | None:
    """The configuration, or None after printing every `file:line: message` to stderr."""
    try:
        return load_config(path)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return None


__all__ = ["age", "load_or_report"]
