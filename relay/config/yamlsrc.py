"""Load YAML into plain Python values while remembering the line of every key and item.

PyYAML's safe loader silently keeps the last of two duplicate keys and forgets positions;
admins need `file:line` for every mistake, so we walk the composed node tree ourselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from relay.config.errors import ConfigError

Path = tuple[str | int, ...]
# A value that could not be read (already reported): its key is left out so that the schema
# does not report the same line again as a wrong type.
_INVALID: Any = object()


@dataclass
class Located:
    """A parsed document plus the 1-based line of every path inside it."""

    file: str
    value: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int:
        """The line of the deepest known prefix of `path` (a missing key reports its parent)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return 1


# Far beyond any real configuration (thousands of values), far below a memory problem.
MAX_VALUES = 100_000


class _Walker:
    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Path, int] = {}
        self.errors: list[ConfigError] = []
        self._constructor = yaml.SafeLoader(stream="")
        self._open: set[int] = set()  # collections being walked: a recursive alias loops
        self._visited = 0

    def walk(self, node: yaml.Node, path: Path) -> Any:
        # Aliases share nodes, so a small text can stand for an exponential tree ("billion
        # laughs"): every value visited counts, and the walk is bounded.
        self._visited += 1
        if self._visited > MAX_VALUES:
            if self._visited == MAX_VALUES + 1:
                self.errors.append(
                    ConfigError(
                        self.file,
                        node.start_mark.line + 1,
                        f"the document expands to more than {MAX_VALUES} values (aliases?)",
                    )
                )
            return _INVALID
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if id(node) in self._open:
                self.errors.append(
                    ConfigError(self.file, node.start_mark.line + 1, "recursive alias")
                )
                return _INVALID
            self._open.add(id(node))
            try:
                return self._collection(node, path)
            finally:
                self._open.discard(id(node))
        return self._scalar(node)

    def _collection(self, node: yaml.Node, path: Path) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self.errors.append(
                        ConfigError(
                            self.file,
                            key_node.start_mark.line + 1,
                            "merge keys (<<) are not supported",
                        )
                    )
                    continue
                key = self._scalar(key_node)
                if key is _INVALID:
                    continue
                if not isinstance(key, str | int):
                    self.errors.append(
                        ConfigError(
                            self.file, key_node.start_mark.line + 1, "a key must be a string"
                        )
                    )
                    continue
                key = str(key)
                if key in out:
                    self.errors.append(
                        ConfigError(
                            self.file,
                            key_node.start_mark.line + 1,
                            f"duplicate key '{key}' (first at line {self.lines[(*path, key)]})",
                        )
                    )
                    continue
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                value = self.walk(value_node, (*path, key))
                if value is not _INVALID:
                    out[key] = value
            return out
        items = [self.walk(item, (*path, i)) for i, item in enumerate(node.value)]
        return [None if item is _INVALID else item for item in items]

    def _scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            return None
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # e.g. an unknown tag such as !foo
            problem = getattr(exc, "problem", None) or "cannot read this value"
        except (ValueError, TypeError, AttributeError):
            # PyYAML's constructors fail this way on a malformed tagged scalar ("!!int x").
            # The value itself is never echoed: it may be a pasted password.
            problem = f"the value is not a valid {node.tag.rpartition(':')[2]}"
        self.errors.append(ConfigError(self.file, node.start_mark.line + 1, problem))
        return _INVALID


def load_yaml(text: str, file: str) -> tuple[Located, list[ConfigError]]:
    """Parse one YAML document; syntax errors come back as ConfigErrors, not exceptions."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        if mark is not None and not text[mark.index :].strip():
            # The parser ran into the end of the stream, which lies after the last line's
            # newline (and any blank lines): the mistake is on the last line with text.
            line = min(line, text[: mark.index].rstrip().count("\n") + 1)
        # The context says what the parser was doing ("expected a single document in the
        # stream"); the problem alone ("but found another document") can read as nonsense.
        said = ", ".join(p for p in (exc.context, exc.problem) if p) or str(exc)
        return Located(file, None), [ConfigError(file, line, f"YAML syntax: {said}")]
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error we know is marked
        return Located(file, None), [ConfigError(file, 1, f"YAML: {exc}")]
    if node is None:
        return Located(file, {}, {(): 1}), []
    walker = _Walker(file)
    value = walker.walk(node, ())
    if value is _INVALID:
        value = None
    return Located(file, value, walker.lines), walker.errors
