"""What several `relay` subcommands share: loading the configuration with its errors printed,
and ages for people."""

from __future__ import annotations

import sys

from relay.config import ConfigErrors, load_config
from relay.config.model import Config


def load_or_report(path: str | None) -> Config | None:
    """The configuration, or None after printing every `file:line: message` to stderr."""
    try:
        return load_config(path)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return None


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
