"""Property-based fuzzing (hypothesis) of the parsers that hostile or broken input reaches
(issue 7, part 5): header handling, the configuration loader, the reply classifier and the
DSN builder. No input may make them raise anything but their own typed errors; header
removal never touches the body; no reply text can inject a header or a line into a DSN.
(The address parser's properties are in test_listener_addresses.py.)"""

from __future__ import annotations

import email
import email.policy
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.bounce.dsn import build_dsn
from relay.config import ConfigErrors, load_config
from relay.config.yamlsrc import load_yaml
from relay.core.message import _fields, header_end, take_headers
from relay.core.model import Outcome, Reply
from relay.delivery import outcome

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes that look like mail: header-ish lines, folding, bare CR/LF, NUL, 8-bit.
_pieces = st.sampled_from(
    [
        b"X-Relay-Org: acme\r\n",
        b"x-relay-org:evil\r\n",
        b"X-Relay-Account: a@b\r\n",
        b"Subject: hi\r\n",
        b" folded\r\n",
        b"\tfolded\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b":",
        b"\x00",
        b"\xff\xfe",
        b"X-Relay-Org",
        b"body line\r\n",
        b".\r\n",
        b"Received: from x\r\n",
    ]
)
message_bytes = st.one_of(st.binary(max_size=300), st.lists(_pieces, max_size=25).map(b"".join))
names = st.sampled_from(["X-Relay-Org", "X-Relay-Account", "x-relay-org", "Subject", "Received"])


def _first_value(data: bytes, name: str) -> str | None:
    """Reference: the first field called `name`, unfolded (one pass per name)."""
    block = data[: header_end(data)]
    for fname, start, stop in _fields(block):
        if fname == name.lower().encode("ascii"):
            raw = block[start:stop].split(b":", 1)[1]
            return raw.replace(b"\r\n", b"").decode("utf-8", "replace").strip()
    return None


def _without_fields(data: bytes, names: list[str]) -> bytes:
    """Reference: the message with every field called one of `names` cut out."""
    keys = {n.lower().encode("ascii") for n in names}
    block = data[: header_end(data)]
    out, pos = b"", 0
    for fname, start, stop in _fields(block):
        if fname in keys:
            out, pos = out + block[pos:start], stop
    return out + data[pos:]


@FUZZ
@given(data=message_bytes, wanted=st.lists(names, min_size=1, max_size=3))
def test_take_headers_gives_first_values_and_strips_every_field_in_one_parse(
    data: bytes, wanted: list[str]
) -> None:
    # The intake reads the two tag headers and strips them with one call (issue 17): the
    # first value of each, and the message without any of them, as a pass per name gives.
    values, rest = take_headers(data, wanted)
    assert values == [_first_value(data, n) for n in wanted]
    assert all(v is None or (isinstance(v, str) and "\r\n" not in v) for v in values)
    assert rest == _without_fields(data, wanted)
    if rest == data:
        assert rest is data  # nothing to strip: no copy of the message


@FUZZ
@given(data=message_bytes, drop=st.lists(names, min_size=1, max_size=3))
def test_take_headers_strips_idempotently_and_never_touches_the_body(
    data: bytes, drop: list[str]
) -> None:
    _, once = take_headers(data, drop)
    values, twice = take_headers(once, drop)
    assert values == [None] * len(drop) and twice is once
    body = data[header_end(data) :]
    assert once.endswith(body)
    assert once[header_end(once) :] == body or header_end(data) == len(data)
    # Only whole header fields went: what is left of the header block is a subsequence.
    assert len(once) <= len(data)


# ---- the configuration loader --------------------------------------------------------------

yaml_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(
                    [
                        "listeners",
                        "upstreams",
                        "clients",
                        "egress_sources",
                        "egress_pools",
                        "spool",
                        "retry",
                        "limits",
                        "port",
                        "host",
                        "tls",
                        "password",
                        "networks",
                        "schedule",
                        "default_upstream",
                        "dns",
                        "hosts",
                        "log",
                        "admin",
                        "org",
                        "domains",
                        "upstream",
                        "members",
                    ]
                ),
                st.text(max_size=8),
            ),
            children,
            max_size=5,
        ),
    ),
    max_leaves=20,
)


@FUZZ
@given(text=st.text(max_size=400))
def test_load_yaml_on_any_text_returns_errors_never_raises(text: str) -> None:
    _located, errors = load_yaml(text, "fuzz.yaml")
    assert all(e.file == "fuzz.yaml" and e.line >= 1 for e in errors)


@FUZZ
@given(doc=yaml_values, policy=st.one_of(st.none(), yaml_values, st.text(max_size=100)))
def test_load_config_raises_only_config_errors(
    tmp_path_factory: pytest.TempPathFactory, doc: object, policy: object
) -> None:
    d = tmp_path_factory.mktemp("cfg")
    (d / "relay.yaml").write_text(yaml.safe_dump(doc))
    (d / "policies").mkdir()
    if policy is not None:
        text = policy if isinstance(policy, str) else yaml.safe_dump(policy)
        (d / "policies" / "org.yaml").write_text(text)
    try:
        load_config(d, environ={})
    except ConfigErrors as exc:
        assert exc.errors and all(str(e) for e in exc.errors)


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    doc = 'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n'
    prev = "a"
    for i in range(1, 10):  # 10**10 values if expanded
        doc += f"l{i}: &l{i} [" + ",".join([f"*{prev}"] * 10) + "]\n"
        prev = f"l{i}"
    (tmp_path / "relay.yaml").write_text(doc)
    started = time.monotonic()
    with pytest.raises(ConfigErrors) as info:
        load_config(tmp_path, environ={})
    assert time.monotonic() - started < 10
    assert any("expands to more than" in str(e) for e in info.value.errors)


# ---- replies -------------------------------------------------------------------------------


@FUZZ
@given(code=st.integers(min_value=-1000, max_value=10_000), message=st.text(max_size=300))
def test_any_reply_classifies_without_raising_and_only_2xx_delivers(
    code: int, message: str
) -> None:
    reply = outcome.parse_reply(code, message)
    assert "\n" not in reply.text and "\r" not in reply.text
    verdict = outcome.classify(reply)
    assert (verdict is Outcome.DELIVERED) == (200 <= code < 300)
    assert (verdict is Outcome.BOUNCED) == (500 <= code < 600)
    outcome.is_throttled(reply)


# ---- DSNs with hostile reply texts ---------------------------------------------------------

hostile_text = st.lists(
    st.sampled_from(
        [
            "a",
            " ",
            ":",
            "\r",
            "\n",
            "\r\n",
            "Bcc: x@evil.test",
            "\x00",
            "\x0b",
            "\x0c",
            "\x1c",
            "\x85",
            "\u2028",
            "é",
            "--",
            "=_dsn_",
            "Content-Type: text/html",
        ]
    ),
    max_size=60,
).map(lambda parts: "".join(parts))


@FUZZ
@given(
    code=st.integers(min_value=400, max_value=599),
    text=hostile_text,
    enhanced=st.one_of(st.none(), st.just("5.1.1"), hostile_text),
    rcpt=st.sampled_from(["gone@y.test", "jörg@y.test", "a\r\nBcc: x@evil.test"]),
)
def test_hostile_reply_texts_cannot_inject_into_a_dsn(
    code: int, text: str, enhanced: str | None, rcpt: str
) -> None:
    dsn = build_dsn(
        reporting_mta="relay.test",
        original_sender="alice@x.test",
        queue_id="Q1",
        arrival=0.0,
        failures=[(rcpt, "bounced", Reply(code, text, enhanced))],
        original_headers=b"Subject: hi\r\nFrom: alice@x.test\r\n",
        now=time.time(),
    )
    # Every line ends in CRLF, nothing bare, nothing too long (RFC 5322 § 2.1.1, § 2.3).
    lines = dsn.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert all(len(line) <= 998 for line in lines)
    msg = email.message_from_bytes(dsn, policy=email.policy.compat32)
    assert sorted(msg.keys()) == sorted(
        [
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "Auto-Submitted",
            "MIME-Version",
            "Content-Type",
        ]
    )
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    assert isinstance(parts[1], email.message.Message)
    status = parts[1].get_payload()
    groups = (
        [p for p in status if isinstance(p, email.message.Message)]
        if isinstance(status, list)
        else []
    )
    fields = {k for g in groups for k in g.keys()}
    assert fields <= {
        "Reporting-MTA",
        "X-Relay-Queue-ID",
        "Arrival-Date",
        "Final-Recipient",
        "Action",
        "Status",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    }, fields
