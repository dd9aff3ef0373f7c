"""Issue 12, findings 1 and 2: a NUL in the body, and message text pipelined after a refused
DATA. Dialogs against a real Listener on loopback (the fixtures and raw client of
test_listener.py)."""

from __future__ import annotations

import pytest

from tests import test_listener as kit
from tests.test_listener import Client, MakeListener

# The dialog fixtures of test_listener.py, used here by name.
ca, cert_files, close_clients, make_listener = (
    kit.ca,
    kit.cert_files,
    kit.close_clients,
    kit.make_listener,
)

SPOOFED = (
    b"RSET\r\nMAIL FROM:<ceo@spoofed.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"Subject: spoofed\r\n\r\npay now\r\n"
)


@pytest.mark.parametrize(
    "body",
    [
        b"Subject: hi\r\n\r\nfirst line\r\nsecond line\r\n\x00.\r\n" + SPOOFED,
        b"Subject: hi\r\n\r\nNUL \x00 in the middle\r\n",
        b"Subject: \x00\r\n\r\nin a header\r\n",
        b"\x00\r\n",
    ],
    ids=["nul-dot-then-commands", "mid-line", "header", "first-byte"],
)
async def test_a_body_with_nul_is_refused_and_nothing_is_queued(
    make_listener: MakeListener, body: bytes
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    await c.send(body + b".\r\n")
    await c.expect("554 5.6.0")  # Postfix: message_reject_characters = \0
    await c.cmd("QUIT", "221 2.0.0")  # the very next reply: nothing ran as a command
    await c.closed()
    assert intake.submitted == []
    assert intake.senders == ["app@example.com"]


async def test_text_pipelined_after_a_refused_data_never_runs(
    make_listener: MakeListener,
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    # The client pipelines RCPT, DATA and the message text without waiting (RFC 2920
    # § 3.1 forbids sending the text before the 354). The recipient is refused, so DATA is
    # refused too, and the text must not be executed as commands.
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.send(b"RCPT TO:<user@refused.example>\r\nDATA\r\n" + SPOOFED + b".\r\n")
    c.last_verb = "RCPT"
    await c.expect("550 5.1.1")
    await c.expect("503 5.5.1")
    await c.expect("421 4.5.0")  # what followed DATA is discarded and the session ends
    await c.closed()
    assert intake.submitted == []
    assert intake.senders == ["app@example.com"]


async def test_a_refused_data_without_pipelined_text_keeps_the_session(
    make_listener: MakeListener,
) -> None:
    # The control case: a client that waits after the refusal goes on as usual.
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@refused.example>\r\nDATA\r\n")
    c.last_verb = "MAIL"
    await c.expect("250 2.1.0")
    await c.expect("550 5.1.1")
    await c.expect("503 5.5.1")
    await c.cmd("RSET", "250 2.0.0")
    reply = await c.send_message(b"Subject: ok\r\n\r\nfine\r\n")
    assert reply[-1].startswith("250 2.0.0")
    assert len(intake.submitted) == 1
