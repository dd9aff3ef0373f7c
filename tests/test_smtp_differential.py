"""aiosmtpd's SMTP protocol as the reference for ours (issue 12): the same generated sessions
go to both servers, one command at a time, each over a real socket pair
(tests/smtpwire.py), and the reply *class* (2xx/3xx/4xx/5xx) must agree command by command.
Where the two differ on purpose, the difference is one of INTENDED below, each a deliberate
hardening or standards choice of ours (listed in SECURITY.md). Any other difference fails the
test with the session that shows it. A session stops comparing at its first difference (the
two servers' states differ from there on).

Both servers accept everyone (aiosmtpd's default handler; our intake accepts all): the
state machine is compared, not relay access. Bounded: a fixed number of sessions of at most
12 commands (a few seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP as ReferenceSMTP
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relay.smtp.session import SmtpSession
from tests.smtpwire import Owner, RecordingIntake, Wire, connect, our_settings

MAX_MESSAGE = 10_000


@dataclass(frozen=True)
class Step:
    text: bytes
    kind: str  # "command" or "body"


def _class(reply: bytes | None) -> str:
    return "closed" if reply is None else reply[:1].decode()


# -- the intended differences ---------------------------------------------------------------------
# Each: (name, predicate on (step, our reply, the reference reply)). Short on purpose.

ROUTING = (b"<@", b"%", b"!", b'"a@b"')


def _routing_trick(step: Step, our_reply: bytes | None, ref_reply: bytes | None) -> bool:
    """D1: source routes, the %-hack, bang paths and '@' in a quoted local part are refused
    (553 5.1.3): downstream servers have treated them as routing (SECURITY.md C5)."""
    ours, ref = _class(our_reply), _class(ref_reply)
    return step.kind == "command" and ours == "5" and ref == "2" and any(
        t in step.text for t in ROUTING
    )


def _smuggling_body(step: Step, our_reply: bytes | None, ref_reply: bytes | None) -> bool:
    """D2: a body with a bare CR, a bare LF or a NUL is refused (554 5.6.0, SMTP smuggling;
    SECURITY.md C2); aiosmtpd accepts it."""
    ours, ref = _class(our_reply), _class(ref_reply)
    body = step.text.replace(b"\r\n", b"")
    return step.kind == "body" and ours == "5" and ref == "2" and (
        b"\r" in body or b"\n" in body or b"\x00" in body
    )


def _dsn_parameters(step: Step, our_reply: bytes | None, ref_reply: bytes | None) -> bool:
    """D3: RFC 3461 parameters (RET, ENVID, NOTIFY, ORCPT) are supported here; aiosmtpd
    refuses them as unknown (555)."""
    ours, ref = _class(our_reply), _class(ref_reply)
    return ours == "2" and ref == "5" and any(
        p in step.text.upper() for p in (b" RET=", b" ENVID=", b" NOTIFY=", b" ORCPT=")
    )


def _utf8_without_smtputf8(step: Step, our_reply: bytes | None, ref_reply: bytes | None) -> bool:
    """D4: a non-ASCII address needs the SMTPUTF8 parameter (RFC 6531 § 3.4; 553 5.6.7);
    aiosmtpd takes it without."""
    ours, ref = _class(our_reply), _class(ref_reply)
    return step.kind == "command" and ours == "5" and ref == "2" and not step.text.isascii() and (
        b"SMTPUTF8" not in step.text.upper()
    )


def _strict_syntax(step: Step, our_reply: bytes | None, ref_reply: bytes | None) -> bool:
    """D5: a HELO/EHLO argument must be a domain or address literal without spaces (it goes
    into our Received header), and a path must close its angle bracket (501); aiosmtpd's
    parser takes both."""
    ours, ref = _class(our_reply), _class(ref_reply)
    verb, text = step.text[:4].upper(), step.text
    if ours != "5" or ref != "2" or step.kind != "command":
        return False
    return verb in (b"HELO", b"EHLO") or (
        verb in (b"MAIL", b"RCPT") and text.count(b"<") != text.count(b">")
    )


def _ends_the_session(step: Step, our_reply: bytes | None, ref_reply: bytes | None) -> bool:
    """D6: too many errors or unknown commands end the session with 421 4.7.0 (RFC 5321
    § 3.8: the reply that closes the channel; SECURITY.md C14); aiosmtpd answers 502 to the
    fifth unknown command and does not count other errors."""
    return our_reply is not None and our_reply.startswith(b"421 4.7.0")


INTENDED: tuple[tuple[str, Callable[[Step, bytes | None, bytes | None], bool]], ...] = (
    ("D1 routing tricks refused", _routing_trick),
    ("D2 bare CR/LF or NUL in DATA refused", _smuggling_body),
    ("D3 DSN parameters supported", _dsn_parameters),
    ("D4 non-ASCII address needs SMTPUTF8", _utf8_without_smtputf8),
    ("D5 strict HELO/EHLO and path syntax", _strict_syntax),
    ("D6 421 when a session has too many errors", _ends_the_session),
)


# -- the sessions -------------------------------------------------------------------------------

COMMANDS = st.sampled_from([
    b"EHLO client.test", b"HELO client.test", b"EHLO", b"HELO a b", b"EHLO [127.0.0.1]",
    b"MAIL FROM:<a@x.test>", b"MAIL FROM:<>", b"MAIL FROM:<a@x.test> SIZE=100",
    b"MAIL FROM:<a@x.test> SIZE=99999999", b"MAIL FROM:<a@x.test> BODY=8BITMIME",
    b"MAIL FROM:<a@x.test> SMTPUTF8", b"MAIL FROM:<a@x.test> RET=HDRS ENVID=e1",
    b"MAIL FROM:<a@x.test> XFOO=1", b"MAIL FROM:a@x.test", b"MAIL FROM:<a@x.test",
    b"MAIL TO:<a@x.test>", b"MAIL FROM:<@r.test:u@x.test>", b"MAIL FROM:",
    b"RCPT TO:<b@x.test>", b"RCPT TO:<Postmaster>", b"RCPT TO:<u%v@x.test>",
    b"RCPT TO:<a!b@x.test>", b'RCPT TO:<"a b"@x.test>', b'RCPT TO:<"a@b"@x.test>',
    b"RCPT TO:<b@x.test> NOTIFY=NEVER", b"RCPT TO:<b@x.test> ORCPT=rfc822;b+40x.test",
    b"RCPT TO:<b@x.test> XFOO=1", b"RCPT TO:<b@[127.0.0.1]>", b"RCPT TO:",
    "RCPT TO:<jos\u00e9@x.test>".encode(), b"RCPT FROM:<b@x.test>",
    b"DATA", b"DATA", b"DATA x", b"RSET", b"RSET x", b"NOOP", b"NOOP x", b"VRFY a@x.test",
    b"VRFY", b"EXPN list", b"HELP", b"XYZZY", b"QUIT", b"mail from:<a@x.test>",
])
BODIES = st.sampled_from([
    b"Subject: a\r\n\r\nhello\r\n", b"Subject: a\r\n\r\n..dot\r\n", b"",
    b"Subject: a\r\n\r\nbare\nLF\r\n", b"Subject: a\r\n\r\nbare\rCR\r\n",
    b"Subject: a\r\n\r\nnul\x00\r\n", "Subject: \u00e9\r\n\r\n8bit\r\n".encode(),
])


@st.composite
def sessions(draw: st.DrawFn) -> list[bytes]:
    """Command lines; a DATA is followed by a body (sent only if both servers said 354)."""
    out = [b"EHLO client.test"] if draw(st.booleans()) else []
    whole = [b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@x.test>", b"DATA"]
    for unit in draw(st.lists(st.one_of(COMMANDS.map(lambda c: [c]), st.just(whole)),
                              min_size=1, max_size=6)):
        for cmd in unit:
            out.append(cmd)
            if cmd == b"DATA":
                out.append(b"\x00BODY" + draw(BODIES))
    return out[:14]


# -- driving both servers -----------------------------------------------------------------------


class _AcceptAll:
    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 OK"


async def _ask(wire: Wire, data: bytes) -> bytes | None:
    """Send `data`; the final line of the one reply it gets (None: the connection closed).
    A reply still waiting (our 421 after a last error reply) answers first, unsent."""
    if not wire.replies and not wire.transport.is_closing():
        wire.transport.write(data)
    deadline = wire.loop.time() + 3.0
    while not wire.replies and wire.loop.time() < deadline and not wire.client.closed:
        await asyncio.sleep(0.0005)
        wire._parse()
    wire._parse()
    assert wire.bad_lines == [], wire.bad_lines
    if not wire.replies:
        assert wire.client.closed, f"no reply to {data[:60]!r}"
        return None
    return wire.replies.pop(0)[-1]


async def _run(loop: asyncio.AbstractEventLoop, script: list[bytes]) -> list[tuple[Step, bytes | None, bytes | None]]:
    owner = Owner(our_settings(max_message_size=MAX_MESSAGE), RecordingIntake())
    ours = await connect(loop, lambda: SmtpSession(owner, None, loop), lambda p: p._task is not None)  # type: ignore[attr-defined]
    ref = await connect(
        loop,
        lambda: ReferenceSMTP(_AcceptAll(), hostname="relay.test", data_size_limit=MAX_MESSAGE,
                              enable_SMTPUTF8=True, loop=loop),
        lambda p: False,
    )
    try:
        for wire in (ours, ref):  # the greetings
            deadline = loop.time() + 3.0
            while not wire.replies and loop.time() < deadline:
                await asyncio.sleep(0.0005)
                wire._parse()
            assert wire.replies and wire.replies.pop(0)[-1][:1] == b"2"
        out: list[tuple[Step, bytes | None, bytes | None]] = []
        for item in script:
            if item.startswith(b"\x00BODY"):
                if not out or out[-1][1] is None or out[-1][1][:3] != b"354":
                    continue  # DATA was refused (by both: the classes agreed)
                step = Step(item[5:] + b".\r\n", "body")
                data = step.text
            else:
                step = Step(item, "command")
                data = item + b"\r\n"
            a, b = await _ask(ours, data), await _ask(ref, data)
            out.append((step, a, b))
            if a is None or b is None or a[:1] != b[:1]:
                break
        return out
    finally:
        ours.close()
        ref.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=sessions())
def test_reply_classes_agree_with_aiosmtpd_but_for_the_intended_differences(
    script: list[bytes],
) -> None:
    loop = asyncio.new_event_loop()
    try:
        exchanges = loop.run_until_complete(asyncio.wait_for(_run(loop, script), 30))
    finally:
        loop.close()
    for step, ours, ref in exchanges:
        a, b = _class(ours), _class(ref)
        if a == b:
            continue
        reasons = [name for name, applies in INTENDED if applies(step, ours, ref)]
        assert reasons, (
            f"unintended difference at {step.text[:80]!r}: ours {ours!r}, aiosmtpd {ref!r}\n"
            f"session: {[s.text[:60] for s, _, _ in exchanges]}"
        )
        event(reasons[0])
