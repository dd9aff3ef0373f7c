"""relay/core/jsonline.py: orjson on the hot path, the standard library's text where the
two would differ or orjson refuses."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json

import pytest

from relay.core.jsonline import dumps


def _reference(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize(
    "value",
    [
        {"ts": 1733340000.123, "event": "delivered", "org": "acme", "tls": True, "n": None},
        {"text": "Grüße, 日本", "reply": {"code": 250, "enhanced": "2.0.0"}, "list": [1, 2.5]},
        {"when": datetime.datetime(2026, 12, 4, 19, 30, tzinfo=datetime.UTC)},
        {"point": Point(3)},
        {1: "an int key", "k": "v"},
        {"lone": "\udcff surrogate kept by surrogateescape"},
        {"big": 1 << 70},
        {"path": __import__("pathlib").Path("/var/spool")},
    ],
    ids=["plain", "unicode", "datetime", "dataclass", "int-key", "surrogate", "big-int", "path"],
)
def test_the_same_text_as_the_standard_library(value: object) -> None:
    assert dumps(value) == _reference(value)


def test_an_enum_is_its_value() -> None:
    assert json.loads(dumps({"c": Colour.RED})) == {"c": "red"}
