"""relay/core/jsonline.py: orjson on the hot path, the standard library's text where the
two would differ or orjson refuses."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.jsonline import dumps
from relay.spool.schema import decode_recipients, encode_recipients
from relay.spool.types import RcptStatus, SpoolRecipient


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


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=40),  # surrogates included: 8-bit addresses kept
            st.sampled_from(list(RcptStatus)),
            st.integers(min_value=0, max_value=1000),
            st.floats(min_value=0, max_value=4e9, allow_nan=False),
            st.text(max_size=60),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_spool_recipients_written_as_before_and_read_back(
    items: list[tuple[str, RcptStatus, int, float, str]],
) -> None:
    # The recipients column is written with orjson now (issue 17): the values the standard
    # library wrote (a float's exponent may be spelt e-8, not e-08), read back as they were.
    rcpts = [SpoolRecipient(rcpt=r, status=s, attempts=a, next_attempt=n, last_reply=t)
             for r, s, a, n, t in items]
    text = encode_recipients(rcpts)
    reference = json.dumps([[r, s.value, a, n, t] for r, s, a, n, t in items],
                           separators=(",", ":"), ensure_ascii=False)
    assert json.loads(text) == json.loads(reference)
    assert decode_recipients(text) == rcpts
