"""The `relay` command."""

from relay.cli.main import main

__all__ = ["main"]
