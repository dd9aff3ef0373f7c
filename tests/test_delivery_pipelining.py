"""PIPELINING on the delivery side (RFC 2920), against a strict server on a real socket.

`GroupServer` proves what the client did on the wire rather than trusting it: with
PIPELINING it answers nothing until the whole group (MAIL, every RCPT, DATA) has arrived,
so a lock-step client would wait forever for its MAIL reply; without PIPELINING it
records how many command lines came in each read, so a client that pipelined anyway is
caught. Bodies, and anything sent after a refused DATA, are recorded too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import pytest

from relay.core.model import EgressSource, Outcome
from relay.delivery import Deliverer, DnsResolver
from tests.sinks import loopback_upstream

SRC = EgressSource("edge-2", "127.0.0.2", "egress2.relay.test")
MSG = b"Subject: hello\r\n\r\n.leading dot\r\nHello.\r\n"


@dataclass
class GroupServer:
    pipelining: bool = True
    mail: bytes = b"250 2.1.0 OK\r\n"
    rcpt: Mapping[str, bytes] = field(default_factory=dict)  # address -> reply; default 250
    hangup_after_mail: bool = False  # answer MAIL, then close: a server dying mid-pipeline
    data_anyway: bool = False  # 354 to DATA even with no valid recipient (non-compliant)
    port: int = 0
    connections: int = 0
    groups: list[list[bytes]] = field(default_factory=list)  # command lines, per group
    lines_per_read: list[int] = field(default_factory=list)  # command lines in each read
    bodies: list[bytes] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> GroupServer:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def commands(self) -> list[bytes]:
        return [line.split(b" ", 1)[0].split(b":", 1)[0] for g in self.groups for line in g]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            async with asyncio.timeout(10):
                await self._dialogue(reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 group.test ESMTP\r\n")
        pending = b""
        group: list[bytes] = []
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\r\n")
            self.lines_per_read.append(len(lines))
            for line in lines:
                verb = line[:4].upper()
                if verb == b"EHLO":
                    offer = b"250-PIPELINING\r\n" if self.pipelining else b""
                    writer.write(b"250-group.test\r\n" + offer + b"250 8BITMIME\r\n")
                elif verb in (b"RSET", b"NOOP"):
                    self.groups.append([line])
                    writer.write(b"250 2.0.0 OK\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    group.append(line)
                    if self.pipelining and verb != b"DATA":
                        continue  # RFC 2920: answer the group once DATA, its end, is in
                    if not await self._answer(group, reader, writer):
                        return
                    group = []
            await writer.drain()

    async def _answer(
        self, group: list[bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Reply to a whole group (or one lock-step command); False: hang up."""
        if group[0][:4].upper() == b"MAIL" or not self.groups:
            self.groups.append([])
        self.groups[-1].extend(group)
        state = self.groups[-1]
        for line in group:
            verb = line[:4].upper()
            if verb == b"MAIL":
                writer.write(self.mail)
                if self.hangup_after_mail:
                    await writer.drain()
                    return False
            elif verb == b"RCPT":
                if not self.mail.startswith(b"250"):
                    writer.write(b"503 5.5.1 Error: need MAIL command\r\n")
                    continue
                writer.write(self._rcpt_reply(line))
            elif verb == b"DATA":
                accepted = self.mail.startswith(b"250") and any(
                    self._rcpt_reply(c).startswith(b"2") for c in state if c[:4].upper() == b"RCPT"
                )
                if not accepted and not self.data_anyway:
                    writer.write(b"554 5.5.1 Error: no valid recipients\r\n")
                    continue
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await writer.drain()
                body = await reader.readuntil(b"\r\n.\r\n")
                self.bodies.append(body)
                writer.write(b"250 2.0.0 OK queued\r\n")
        return True

    def _rcpt_reply(self, line: bytes) -> bytes:
        address = line.split(b"<", 1)[1].rstrip(b">").decode()
        return self.rcpt.get(address, b"250 2.1.5 OK\r\n")




@pytest.fixture
async def deliverer() -> AsyncIterator[Deliverer]:
    d = Deliverer(DnsResolver({"mx.test": ["127.0.0.1"]}), data_timeout=3.0, quit_timeout=1.0)
    yield d
    await d.close()


async def test_pipelined_group_with_one_recipient_refused(deliverer: Deliverer) -> None:
    async with GroupServer(rcpt={"b@x.test": b"550 5.1.1 <b@x.test>: no such user\r\n"}) as srv:
        results = await deliverer.deliver(
            loopback_upstream(srv.port), SRC, "s@saas.test", ["a@x.test", "b@x.test", "c@x.test"], MSG
        )
        assert [(r.recipient, r.outcome) for r in results] == [
            ("a@x.test", Outcome.DELIVERED),
            ("b@x.test", Outcome.BOUNCED),
            ("c@x.test", Outcome.DELIVERED),
        ]
        assert str(results[1].reply) == "550 5.1.1 <b@x.test>: no such user"
        assert str(results[0].reply) == "250 2.0.0 OK queued"
        # One group, one body: dot-stuffed on the wire (RFC 5321 § 4.5.2).
        assert srv.commands == [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"]
        assert srv.bodies == [b"Subject: hello\r\n\r\n..leading dot\r\nHello.\r\n.\r\n"]

        # The session completed its transaction: reused without RSET, again pipelined.
        [again] = await deliverer.deliver(loopback_upstream(srv.port), SRC, "s@saas.test", ["d@x.test"], MSG)
        assert again.outcome is Outcome.DELIVERED
        assert srv.connections == 1
        assert srv.commands[5:] == [b"MAIL", b"RCPT", b"DATA"]


async def test_every_recipient_refused_sends_no_body_and_resets_before_reuse(
    deliverer: Deliverer,
) -> None:
    refusals = {
        "a@x.test": b"550 5.1.1 no such user\r\n",
        "b@x.test": b"450 4.2.1 mailbox busy\r\n",
    }
    async with GroupServer(rcpt=refusals) as srv:
        results = await deliverer.deliver(
            loopback_upstream(srv.port), SRC, "s@saas.test", ["a@x.test", "b@x.test"], MSG
        )
        assert [(r.outcome, str(r.reply)) for r in results] == [
            (Outcome.BOUNCED, "550 5.1.1 no such user"),
            (Outcome.DEFERRED, "450 4.2.1 mailbox busy"),
        ]
        # DATA went with the group and was refused (RFC 2920 § 3.1); no body followed.
        assert srv.commands == [b"MAIL", b"RCPT", b"RCPT", b"DATA"]
        assert srv.bodies == []

        [ok] = await deliverer.deliver(loopback_upstream(srv.port), SRC, "s@saas.test", ["c@x.test"], MSG)
        assert ok.outcome is Outcome.DELIVERED
        # The same connection, reset first: the server still held the sender from before.
        assert srv.connections == 1
        assert srv.commands[4:] == [b"RSET", b"MAIL", b"RCPT", b"DATA"]
        assert len(srv.bodies) == 1


async def test_a_354_without_valid_recipients_gets_no_body_but_a_closed_connection(
    deliverer: Deliverer,
) -> None:
    async with GroupServer(rcpt={"a@x.test": b"550 5.1.1 no such user\r\n"}) as srv:
        srv.data_anyway = True
        [result] = await deliverer.deliver(
            loopback_upstream(srv.port), SRC, "s@saas.test", ["a@x.test"], MSG
        )
        assert (result.outcome, str(result.reply)) == (Outcome.BOUNCED, "550 5.1.1 no such user")
        # The server waits for a body; a lone "." would deliver an empty message, so the
        # connection is closed instead, which aborts the transaction (RFC 5321 § 4.1.1.4).
        assert deliverer.pool.idle_count() == 0
        [ok] = await deliverer.deliver(loopback_upstream(srv.port), SRC, "s@saas.test", ["b@x.test"], MSG)
        assert ok.outcome is Outcome.DELIVERED
        assert srv.connections == 2
        assert len(srv.bodies) == 1


async def test_refused_sender_in_a_pipelined_group(deliverer: Deliverer) -> None:
    async with GroupServer(mail=b"553 5.7.1 sender rejected\r\n") as srv:
        results = await deliverer.deliver(
            loopback_upstream(srv.port), SRC, "s@saas.test", ["a@x.test", "b@x.test"], MSG
        )
        assert [(r.outcome, str(r.reply)) for r in results] == [
            (Outcome.BOUNCED, "553 5.7.1 sender rejected")
        ] * 2
        assert srv.bodies == []
        # Every reply of the group was read (the RCPTs' and DATA's 503s), so the session
        # is in step: a NOOP-free reuse starts with RSET and gets its own replies.
        srv.mail = b"250 2.1.0 OK\r\n"
        [ok] = await deliverer.deliver(loopback_upstream(srv.port), SRC, "s@saas.test", ["c@x.test"], MSG)
        assert ok.outcome is Outcome.DELIVERED
        assert srv.connections == 1
        assert srv.commands[-4:] == [b"RSET", b"MAIL", b"RCPT", b"DATA"]


async def test_server_without_pipelining_gets_lock_step(deliverer: Deliverer) -> None:
    async with GroupServer(
        pipelining=False, rcpt={"b@x.test": b"550 5.1.1 no such user\r\n"}
    ) as srv:
        results = await deliverer.deliver(
            loopback_upstream(srv.port), SRC, "s@saas.test", ["a@x.test", "b@x.test"], MSG
        )
        assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.BOUNCED]
        assert srv.commands == [b"MAIL", b"RCPT", b"RCPT", b"DATA"]
        # Never more than one command per read: each waited for the previous reply.
        assert max(srv.lines_per_read) == 1
        assert len(srv.bodies) == 1

        # Every recipient refused, lock-step: DATA is never sent at all.
        [gone] = await deliverer.deliver(loopback_upstream(srv.port), SRC, "s@saas.test", ["b@x.test"], MSG)
        assert gone.outcome is Outcome.BOUNCED
        assert srv.commands[4:] == [b"MAIL", b"RCPT"]
        assert max(srv.lines_per_read) == 1


async def test_server_hanging_up_mid_pipeline_defers_everything(deliverer: Deliverer) -> None:
    async with GroupServer(hangup_after_mail=True) as srv:
        results = await deliverer.deliver(
            loopback_upstream(srv.port), SRC, "s@saas.test", ["a@x.test", "b@x.test"], MSG
        )
        for r in results:
            assert r.outcome is Outcome.DEFERRED
            assert r.reply.enhanced == "4.4.2"
            assert f"connection to 127.0.0.1:{srv.port} lost during RCPT TO" in r.reply.text
        assert srv.bodies == []
        assert deliverer.pool.idle_count() == 0  # a broken session is never pooled


async def test_reused_session_that_hangs_up_at_mail_reconnects_pipelined(
    deliverer: Deliverer,
) -> None:
    async with GroupServer() as srv:
        [first] = await deliverer.deliver(loopback_upstream(srv.port), SRC, "s@saas.test", ["a@x.test"], MSG)
        assert first.outcome is Outcome.DELIVERED
        assert deliverer.pool.idle_count() == 1
        srv.hangup_after_mail = True
        srv.mail = b"421 4.4.2 idle too long, closing\r\n"
        [second] = await deliverer.deliver(
            loopback_upstream(srv.port), SRC, "s@saas.test", ["b@x.test"], MSG
        )
        # The pooled session's group met a 421 at MAIL: nothing was accepted there, so the
        # delivery moved to a fresh connection, whose own 421 is a throttle (RFC 5321 § 3.8).
        assert srv.connections == 2
        assert second.outcome is Outcome.DEFERRED
        assert second.throttled
        assert str(second.reply) == "421 4.4.2 idle too long, closing"
