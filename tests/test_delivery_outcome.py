"""Table tests for reply classification (relay/delivery/outcome.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.model import Outcome, Reply
from relay.delivery import outcome


@pytest.mark.parametrize(
    ("code", "message", "text", "enhanced"),
    [
        (250, "2.0.0 Ok: queued as 4BQ3", "2.0.0 Ok: queued as 4BQ3", "2.0.0"),
        (550, "5.1.1 no such user", "5.1.1 no such user", "5.1.1"),
        (451, "4.3.0 try later", "4.3.0 try later", "4.3.0"),
        (250, "OK", "OK", None),
        # Class must match the reply code (RFC 2034 § 4); otherwise it is just text.
        (550, "4.1.1 odd server", "4.1.1 odd server", None),
        (421, "4.7.0 Try again later, closing connection.", None, "4.7.0"),
        (550, "5.1.10 RESOLVER.ADR.RecipientNotFound", None, "5.1.10"),
        (550, "5.1.1x not a code", None, None),
        # Multi-line replies become one line, words unchanged.
        (
            550,
            "5.1.1 The email account that you tried to reach does not exist.\n"
            "5.1.1 Please try double-checking the recipient's email address",
            "5.1.1 The email account that you tried to reach does not exist. "
            "5.1.1 Please try double-checking the recipient's email address",
            "5.1.1",
        ),
    ],
)
def test_parse_reply(code: int, message: str, text: str | None, enhanced: str | None) -> None:
    reply = outcome.parse_reply(code, message)
    assert reply.code == code
    assert reply.text == (text if text is not None else message)
    assert reply.enhanced == enhanced


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (250, Outcome.DELIVERED),
        (251, Outcome.DELIVERED),
        (421, Outcome.DEFERRED),
        (450, Outcome.DEFERRED),
        (451, Outcome.DEFERRED),
        (452, Outcome.DEFERRED),
        (500, Outcome.BOUNCED),
        (535, Outcome.BOUNCED),
        (550, Outcome.BOUNCED),
        (554, Outcome.BOUNCED),
    ],
)
def test_classify(code: int, expected: Outcome) -> None:
    assert outcome.classify(Reply(code, "x")) is expected


@pytest.mark.parametrize(
    ("reply", "throttled"),
    [
        ("421 4.7.0 slow down", True),
        ("421 Service not available, closing transmission channel", True),
        ("451 4.7.1 Please try again later", True),  # policy class: rate limits
        ("451 4.7.650 The mail server has been temporarily rate limited", True),
        ("450 4.7.1 Client host rejected: too many connections", True),
        ("452 4.2.2 Quota exceeded for sender", True),
        ("450 Too many messages, slow down", True),
        ("451 4.3.0 try later", False),
        ("450 4.2.1 mailbox busy", False),
        ("452 4.5.3 Too many recipients", False),  # about this message, not the upstream
        ("451 4.4.2 connection dropped", False),
        ("550 5.7.1 Rate limit exceeded permanently", False),  # permanent: final
        ("554 5.7.1 too many messages", False),
        ("250 2.0.0 OK rate", False),
    ],
)
def test_is_throttled(reply: str, throttled: bool) -> None:
    code, _, message = reply.partition(" ")
    assert outcome.is_throttled(outcome.parse_reply(int(code), message)) is throttled


@pytest.mark.parametrize(
    ("sender", "recipients", "needed"),
    [
        ("a@b.test", ["c@d.test"], False),
        ("", ["c@d.test"], False),
        ("jösé@b.test", ["c@d.test"], True),
        ("a@b.test", ["c@d.test", "ü@d.test"], True),
        ("a@bücher.test", [], True),
    ],
)
def test_needs_smtputf8(sender: str, recipients: list[str], needed: bool) -> None:
    assert outcome.needs_smtputf8(sender, recipients) is needed


@pytest.mark.parametrize(
    ("data", "needed"),
    [(b"Subject: x\r\n\r\nplain\r\n", False), ("Subject: x\r\n\r\ncafé\r\n".encode(), True)],
)
def test_needs_8bitmime(data: bytes, needed: bool) -> None:
    assert outcome.needs_8bitmime(data) is needed


@pytest.mark.parametrize(
    ("make", "code", "enhanced"),
    [
        (outcome.no_answer, 451, "4.4.1"),
        (outcome.bad_connection, 451, "4.4.2"),
        (outcome.dns_failure, 451, "4.4.3"),
        (outcome.tls_failure, 454, "4.7.5"),
        (outcome.tls_unavailable, 454, "4.7.10"),
        (outcome.utf8_unsupported, 553, "5.6.7"),
    ],
)
def test_synthesised_replies_look_like_server_replies(
    make: object, code: int, enhanced: str
) -> None:
    assert callable(make)
    reply = make("something\r\nhappened")
    assert isinstance(reply, Reply)
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert reply.text == f"{enhanced} something  happened"
    # Parsing our own text gives the same enhanced code back.
    assert outcome.parse_reply(reply.code, reply.text) == reply


@given(
    code=st.integers(min_value=200, max_value=599),
    message=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200),
)
def test_parse_reply_is_always_one_line_and_consistent(code: int, message: str) -> None:
    reply = outcome.parse_reply(code, message)
    assert "\n" not in reply.text and "\r" not in reply.text
    if reply.enhanced is not None:
        assert reply.text.startswith(reply.enhanced)
        assert reply.enhanced[0] == str(code)[0]
    assert outcome.classify(reply) is (
        Outcome.DELIVERED if code < 300 else Outcome.DEFERRED if code < 500 else Outcome.BOUNCED
    )
    if code >= 500:
        assert not outcome.is_throttled(reply)
