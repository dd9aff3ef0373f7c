"""The DATA checks' two screens (relay/smtp/bodycheck.py): the `bytes`-method one for small
bodies and the numpy one from VECTOR_FROM bytes on must pass exactly the bodies the
line-by-line reader (`first_problem`) finds nothing in; then large bodies through a real
listener, each fault placed far past where the vector screen takes over."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp import bodycheck
from relay.smtp.bodycheck import (
    VECTOR_FROM,
    body_problem,
    clean_by_splitting,
    clean_by_vector,
    examine,
    first_problem,
)
from relay.smtp.replies import R_BARE_NEWLINE
from tests import test_listener as kit
from tests.test_listener import Client, MakeListener

ca, cert_files, close_clients, make_listener = (
    kit.ca,
    kit.cert_files,
    kit.close_clients,
    kit.make_listener,
)

MAX_LINE = 12  # small, so that generated lines cross it often
NO_LIMIT = 1 << 30

# Lines over a small alphabet that holds the troublemakers; mostly clean ones.
_line = st.one_of(
    st.text(alphabet="ab. ", max_size=14).map(str.encode),
    st.text(alphabet="ab\r\n\x00.", max_size=14).map(str.encode),
)


def _body(lines: list[bytes]) -> bytes:
    """The buffer the checks see: the DATA line's CRLF, then CRLF-ended lines."""
    return b"\r\n" + b"".join(line + b"\r\n" for line in lines)


@settings(max_examples=400, deadline=None)
@given(st.lists(_line, max_size=12))
def test_both_screens_agree_and_never_pass_what_the_line_reader_refuses(
    lines: list[bytes],
) -> None:
    """The screens do not look for NUL (body_problem does, before them) and count a stuffed
    line's dot (a line at the limit with a dot goes to the line reader): they may send a good
    body on to the exact check, never wave a bad one through."""
    body = _body(lines)
    by_splitting = clean_by_splitting(body, MAX_LINE)
    assert clean_by_vector(body, MAX_LINE) is by_splitting
    assert clean_by_vector(bytearray(body), MAX_LINE) is by_splitting
    if by_splitting:
        assert first_problem(body[2:].replace(b"\x00", b"a"), MAX_LINE, NO_LIMIT) is None
    assert body_problem(body, MAX_LINE, NO_LIMIT) == first_problem(body[2:], MAX_LINE, NO_LIMIT)


@settings(max_examples=300, deadline=None)
@given(st.lists(_line, max_size=12), st.booleans())
def test_examine_gives_the_refusal_and_whether_a_line_was_stuffed(
    lines: list[bytes], vector: bool
) -> None:
    """The session's one call at the end of DATA, on either path (VECTOR_FROM moved so
    that short generated bodies take the numpy one)."""
    body = _body(lines)
    saved = bodycheck.VECTOR_FROM
    bodycheck.VECTOR_FROM = 0 if vector else 1 << 30
    try:
        assert examine(body, MAX_LINE, NO_LIMIT) == (
            body_problem(body, MAX_LINE, NO_LIMIT),
            b"\r\n." in body,
        )
    finally:
        bodycheck.VECTOR_FROM = saved


@pytest.mark.parametrize(
    ("body", "clean"),
    [
        (b"", True),  # no line at all (only the oversized path can ask this)
        (b"\r\n", True),
        (b"\n", False),  # a bare LF first
        (b"\r", False),
        (b"\r\nabc", True),  # an open last line within the limit
        (b"\r\n" + b"x" * (MAX_LINE - 1), False),
        (b"x" * (MAX_LINE - 2) + b"\r\n", True),
        (b"x" * (MAX_LINE - 1) + b"\r\n", False),
    ],
)
def test_the_vector_screen_at_the_edges(body: bytes, clean: bool) -> None:
    assert clean_by_vector(body, MAX_LINE) is clean


def _mime_lines(size: int) -> bytes:
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3"
    count = size // (len(line) + 2) + 1
    return b"Subject: large\r\n\r\n" + b"".join(line + b"\r\n" for _ in range(count))


@pytest.mark.interpreted  # patches bodycheck._vector_scan
def test_the_large_body_path_is_the_vector_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body from VECTOR_FROM bytes on goes through the numpy screen, a smaller one not;
    a body the screen does not pass goes to the line reader, which decides (and the stuffed
    lines are then looked for with a bytes search)."""
    calls: list[int] = []
    real = bodycheck._vector_scan

    def spy(lines: bytes | bytearray, max_line: int) -> tuple[bool, bool]:
        calls.append(len(lines))
        return real(lines, max_line)

    monkeypatch.setattr(bodycheck, "_vector_scan", spy)
    large = b"\r\n" + _mime_lines(VECTOR_FROM)
    small = b"\r\n" + _mime_lines(VECTOR_FROM // 4)
    assert body_problem(large, 1000, NO_LIMIT) is None
    assert body_problem(small, 1000, NO_LIMIT) is None
    assert calls == [len(large)]

    monkeypatch.setattr(bodycheck, "_vector_scan", lambda lines, max_line: (False, False))
    dotted = large + b"..stuffed\r\n"
    assert examine(dotted, 1000, NO_LIMIT) == (None, True)
    assert examine(dotted + b"bare\nLF\r\n", 1000, NO_LIMIT)[0] == R_BARE_NEWLINE


@pytest.mark.parametrize(
    ("fault", "reply"),
    [
        (b"bare LF\n here\r\n", "554 5.6.0 Bare CR"),
        (b"bare CR\r here\r\n", "554 5.6.0 Bare CR"),
        (b"y" * 1200 + b"\r\n", "500 5.5.2"),
        (b"NUL \x00 here\r\n", "554 5.6.0 NUL"),
    ],
    ids=["bare-lf", "bare-cr", "long-line", "nul"],
)
async def test_a_large_body_with_a_fault_near_its_end_is_refused(
    make_listener: MakeListener, fault: bytes, reply: str
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    refused = await c.send_message(_mime_lines(300_000) + fault + b"last line\r\n")
    assert refused[-1].startswith(reply)
    clean = _mime_lines(300_000)
    accepted = await c.send_message(clean)  # the session goes on
    assert accepted[-1].startswith("250 2.0.0")
    await c.cmd("QUIT", "221 2.0.0")
    assert len(intake.submitted) == 1
    assert intake.submitted[0][1].data.endswith(clean)


@pytest.mark.parametrize("size", [100, 300_000], ids=["small", "large"])
async def test_a_stuffed_line_is_unstuffed_and_the_body_is_not_sent_as_received(
    make_listener: MakeListener, size: int
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    for stuffed in (False, True):
        tail = b"..a line that starts with a dot\r\n" if stuffed else b"a.b\r\n"
        answer = await c.send_message(_mime_lines(size) + tail + b"last\r\n")
        assert answer[-1].startswith("250 2.0.0")
    await c.cmd("QUIT", "221 2.0.0")
    plain, dotted = (envelope for _, envelope in intake.submitted)
    assert plain.wire and plain.data.endswith(b"a.b\r\nlast\r\n")
    assert not dotted.wire
    assert dotted.data.endswith(b"\r\n.a line that starts with a dot\r\nlast\r\n")


@pytest.mark.parametrize("body", [b"abc\r\n.x", b"abc\r\nx", b"\r\n.x\r\n", b"abc", b"a\rb\r\n"])
def test_the_vector_scan_answers_python_bools(body: bytes) -> None:
    """Both answers are `bool`, never numpy's `bool`: the functions say `bool`, and code
    that trusts the annotation (a `mypyc` build checks it and raises TypeError) must get one."""
    answers = bodycheck._vector_scan(body, MAX_LINE)
    assert [type(a) for a in answers] == [bool, bool]
