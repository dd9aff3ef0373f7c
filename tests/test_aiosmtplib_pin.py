"""The parts of aiosmtplib that relay/delivery relies on beyond its documented API, pinned.

relay/delivery/connection.py opens a session with aiosmtplib (connect on our own bound socket,
TLS, EHLO, AUTH) and then relay/delivery/channel.py takes the session's transport over
(`transport.set_protocol`) for pipelined transactions. That hand-over depends on
aiosmtplib internals: the `transport` and `protocol` attributes, its protocol's read buffer
being empty once a reply was returned, the constructor's keywords, and the names it keeps
the server's extensions and AUTH methods under. pyproject.toml pins the major version this
was written against; if an upgrade changes any of these, this test fails first and says
which (rather than delivery misbehaving on a real upstream)."""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import aiosmtplib

from relay.delivery.channel import Channel
from tests.conftest import MakeSink

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
MAJOR = 5  # the aiosmtplib major version relay/delivery/channel.py was written against


def test_pyproject_pins_the_major_version_that_is_installed() -> None:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    [spec] = [d for d in deps if d.startswith("aiosmtplib")]
    assert re.fullmatch(rf"aiosmtplib>={MAJOR}\.\d+,<{MAJOR + 1}", spec), (
        f"pyproject.toml must pin aiosmtplib to {MAJOR}.x ({spec!r}): relay/delivery/channel.py"
        " relies on its internals"
    )
    installed = version("aiosmtplib")
    assert installed.split(".")[0] == str(MAJOR), (
        f"aiosmtplib {installed} is installed; relay/delivery relies on {MAJOR}.x internals:"
        " re-check tests/test_aiosmtplib_pin.py's list before moving the pin"
    )


def test_the_constructor_and_attributes_delivery_uses_exist() -> None:
    params = inspect.signature(aiosmtplib.SMTP.__init__).parameters
    for name in ("hostname", "sock", "local_hostname", "timeout", "use_tls", "start_tls",
                 "tls_context", "validate_certs"):
        assert name in params, f"aiosmtplib.SMTP() no longer takes {name}="
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1")
    for name in ("transport", "protocol", "esmtp_extensions", "server_auth_methods",
                 "is_connected", "supports_extension", "get_transport_info"):
        assert hasattr(smtp, name), f"aiosmtplib.SMTP has no {name} any more"
    for name in ("code", "message"):
        assert name in inspect.signature(aiosmtplib.SMTPResponseException.__init__).parameters


async def test_the_transport_can_be_taken_over_after_ehlo_without_losing_a_byte(
    make_sink: MakeSink,
) -> None:
    sink = await make_sink()
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, local_hostname="pin.test",
                           start_tls=False, timeout=5)
    await smtp.connect()
    await smtp.ehlo()
    assert "pipelining" in smtp.esmtp_extensions, "esmtp_extensions: lower-case keywords"
    protocol = smtp.protocol
    assert protocol is not None and smtp.transport is not None
    # After a returned reply aiosmtplib holds no unread bytes and waits for none.
    buffer = getattr(protocol, "_buffer", None)
    assert buffer is not None and len(buffer) == 0, "aiosmtplib's protocol buffer changed"
    assert getattr(protocol, "_response_pending", None) is False, (
        "aiosmtplib's protocol expects no reply after EHLO returned: changed"
    )
    channel = Channel.take_over(smtp.transport)  # type: ignore[arg-type]
    assert smtp.transport.get_protocol() is channel
    channel.send(b"MAIL FROM:<a@pin.test>\r\nRCPT TO:<b@pin.test>\r\nDATA\r\n")
    assert [(await channel.reply(5))[0] for _ in range(3)] == [250, 250, 354]
    channel.send(b"Subject: pin\r\n\r\nhello\r\n.\r\n")
    assert (await channel.reply(5))[0] == 250
    await channel.quit(5)
    await sink.wait_idle()
    assert len(sink.messages) == 1
