"""Which build is running: interpreted, or compiled by mypyc (setup.py, RELAY_COMPILE=1).

Read from the package directory (the extension modules beside the sources), so an operator
and the tests see what was installed, not what was asked for."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

import relay


def compiled_modules() -> list[str]:
    """The relay's modules that are C extensions, as paths like "relay/smtp/session.py"."""
    root = Path(relay.__file__).parent
    found: list[str] = []
    for path in root.rglob("*.so"):
        # The most specific suffix first (".cpython-311-x86_64-linux-gnu.so", then ".so").
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if path.name.endswith(suffix):
                stem = path.name[: -len(suffix)]
                found.append((path.parent / (stem + ".py")).relative_to(root.parent).as_posix())
                break
    return sorted(found)


def describe() -> str:
    """One phrase for the start-up log line."""
    compiled = compiled_modules()
    if not compiled:
        return "interpreted (pure Python)"
    return f"compiled by mypyc ({len(compiled)} modules)"
