"""Configuration errors, each pinned to `file:line` (maddy's NodeErr idea)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConfigError:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConfigErrors(Exception):
    """Every problem found in one load, in file/line order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = sorted(set(errors), key=lambda e: (e.file, e.line, e.message))
        super().__init__("\n".join(str(e) for e in self.errors))
