"""Opening one ready-to-send SMTP session to an upstream from one egress source.

Resolve → bind to the egress address and connect → greeting → EHLO (HELO fallback) →
TLS (implicit or required STARTTLS, verified against the upstream's *name* although we
connect to an address) → AUTH, with aiosmtplib; then the session's transport is handed to
a `Channel` (relay.delivery.channel) for the mail transactions. Every failure becomes a
`SessionError` carrying the upstream's own reply, or a synthesised one saying what
happened; nothing here retries.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib

from relay.core.errors import RelayError
from relay.core.model import EgressSource, Reply, TlsMode, Upstream
from relay.delivery import outcome
from relay.delivery.channel import BadReply, Channel
from relay.delivery.resolver import Resolver
from relay.delivery.xoauth import OAuthProblem, authenticate_oauth
from relay.oauth import TokenBroker

PoolKey = tuple[str, int, str, str, str]

# A name with more addresses than this is still tried, but only its first few: every
# network loop is bounded (each attempt can take connect_timeout).
MAX_ADDRESSES_TRIED = 8


class SessionError(Exception):
    """The session could not be opened or broke; `reply` says why, for every recipient."""

    def __init__(self, reply: Reply, *, throttled: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.throttled = throttled


@dataclass(eq=False)
class Session:
    """A connected, greeted, secured and authenticated SMTP client."""

    channel: Channel
    # What the server's EHLO offered (lower-case keywords: "pipelining", "size", ...);
    # empty after a HELO fallback.
    extensions: frozenset[str]
    key: PoolKey
    peer: str  # "203.0.113.5:465", for reply texts and logs
    source: str  # the egress address we bound to
    messages: int = 0  # MAIL transactions started on this connection
    # True when the last transaction ended with DATA's final reply, which resets the
    # server's state (RFC 5321 § 4.1.1.4): the next one needs no RSET first.
    clean: bool = False
    idle_handle: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.channel.alive

    def supports(self, extension: str) -> bool:
        return extension in self.extensions


def _peer(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error behind `exc`, following the cause/context chain (bounded)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_reply(err: ssl.SSLError, upstream: Upstream, peer: str) -> Reply:
    if isinstance(err, ssl.SSLCertVerificationError):
        why = err.verify_message or err.reason or str(err)
        return outcome.tls_failure(
            f"TLS certificate verification failed for {upstream.host} at {peer}: {why}"
        )
    return outcome.tls_failure(
        f"TLS handshake with {upstream.host} at {peer} failed: {err.reason or err}"
    )


def error_reply(
    exc: BaseException, upstream: Upstream, peer: str, source: str, stage: str
) -> Reply:
    """A Reply for an exception raised while talking to an upstream during `stage`."""
    tls = _ssl_cause(exc)
    if tls is not None:
        return _tls_reply(tls, upstream, peer)
    if isinstance(exc, BadReply):
        return outcome.bad_connection(
            f"invalid reply from {peer} during {stage} (from {source}): {exc}"
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if not 200 <= exc.code < 600:
            # aiosmtplib's -1: a line that is not a reply at all, or one too long to read.
            # Our words, with the peer's garbage quoted (bounded by aiosmtplib's line limit).
            return outcome.bad_connection(
                f"invalid reply from {peer} during {stage} (from {source}): {exc.message}"
            )
        return outcome.parse_reply(exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return outcome.bad_connection(
            f"timed out waiting for the {stage} reply from {peer} (from {source})"
        )
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError):
        return outcome.bad_connection(f"connection to {peer} lost during {stage} (from {source})")
    return outcome.bad_connection(f"{stage} with {peer} failed (from {source}): {exc}")


class TlsContexts:
    """One client SSLContext per (verify, ca_file), built once off the event loop."""

    def __init__(self, logger: logging.Logger) -> None:
        self._contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
        self._warned: set[str] = set()
        self._logger = logger

    async def get(self, upstream: Upstream) -> ssl.SSLContext:
        if not upstream.verify_tls and upstream.id not in self._warned:
            self._warned.add(upstream.id)
            self._logger.warning(
                "upstream %s: TLS certificate verification is disabled (verify_tls: false); "
                "the connection is encrypted but its peer is not authenticated",
                upstream.id,
            )
        key = (upstream.verify_tls, upstream.ca_file)
        context = self._contexts.get(key)
        if context is None:
            context = await asyncio.to_thread(self._build, upstream.verify_tls, upstream.ca_file)
            self._contexts[key] = context
        return context

    @staticmethod
    def _build(verify: bool, ca_file: str | None) -> ssl.SSLContext:
        # With ca_file we trust exactly that bundle (a private CA); otherwise the system's.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class _BindError(Exception):
    """Binding to the egress address failed: our side is wrong, no upstream address helps."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.strerror or str(cause))
        self.cause = cause


async def _connect_socket(
    address: str, port: int, source: EgressSource, connect_timeout: float
) -> socket.socket:
    """A TCP socket bound to the egress address and connected to address:port."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(source.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.bind((source.address, 0))
        except OSError as exc:
            raise _BindError(exc) from exc
        async with asyncio.timeout(connect_timeout):
            await loop.sock_connect(sock, (address, port))
        refuse_self_connect(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def refuse_self_connect(sock: socket.socket) -> None:
    """A connect to a closed port on our own host can succeed against itself when the
    kernel picks that same port as our source (TCP simultaneous open, RFC 793 § 3.4): we
    would then talk to ourselves, and hold the port the upstream wants to listen on. Seen
    with a loopback upstream while it was down; treated as the refusal it really is."""
    if sock.getsockname()[:2] == sock.getpeername()[:2]:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "connected to itself (port closed)")


async def open_session(
    upstream: Upstream,
    source: EgressSource,
    resolver: Resolver,
    contexts: TlsContexts,
    logger: logging.Logger,
    tokens: TokenBroker | None = None,
) -> Session:
    """Connect, greet, secure and authenticate, or raise SessionError."""
    try:
        addresses = await resolver.resolve(upstream.host, source.family)
    except RelayError as exc:
        # Even a name that does not exist defers: the upstream is configured by an admin,
        # and fixing the configuration must not have bounced the mail in the meantime.
        raise SessionError(
            outcome.dns_failure(f"cannot resolve {upstream.host}: {exc.reason}")
        ) from exc
    if not addresses:
        raise SessionError(outcome.dns_failure(f"{upstream.host} has no address"))

    tls_context: ssl.SSLContext | None = None
    if upstream.tls is not TlsMode.NONE:
        try:
            tls_context = await contexts.get(upstream)
        except (OSError, ValueError) as exc:
            raise SessionError(
                outcome.tls_failure(f"cannot load CA file for upstream {upstream.id}: {exc}")
            ) from exc

    failures: list[str] = []
    for address in addresses[:MAX_ADDRESSES_TRIED]:
        peer = _peer(address, upstream.port)
        try:
            sock = await _connect_socket(address, upstream.port, source, upstream.connect_timeout)
        except _BindError as exc:
            raise SessionError(
                outcome.no_answer(
                    f"cannot bind egress source {source.name} ({source.address}): {exc}"
                )
            ) from exc
        except TimeoutError:
            failures.append(
                f"connection to {peer} from {source.address} timed out "
                f"after {upstream.connect_timeout:g}s"
            )
            continue
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                failures.append(f"connection refused by {peer} from {source.address}")
            else:
                failures.append(
                    f"cannot connect to {peer} from {source.address}: {exc.strerror or exc}"
                )
            continue
        logger.debug("upstream %s: connected to %s from %s", upstream.id, peer, source.address)
        return await _greet(upstream, source, sock, peer, tls_context, logger, tokens)
    raise SessionError(outcome.no_answer("; ".join(failures)))


async def _greet(
    upstream: Upstream,
    source: EgressSource,
    sock: socket.socket,
    peer: str,
    tls_context: ssl.SSLContext | None,
    logger: logging.Logger,
    tokens: TokenBroker | None = None,
) -> Session:
    implicit = upstream.tls is TlsMode.IMPLICIT
    smtp = aiosmtplib.SMTP(
        # With sock= aiosmtplib uses hostname only as the TLS server name: the certificate
        # is checked against the upstream's configured name, not the address we dialled.
        hostname=upstream.host,
        sock=sock,
        local_hostname=source.ehlo,
        timeout=upstream.command_timeout,
        use_tls=implicit,
        start_tls=False,
        tls_context=tls_context if implicit else None,
        validate_certs=upstream.verify_tls,
    )
    key: PoolKey = (*upstream.pool_key, source.address)
    stage = "TLS handshake" if implicit else "greeting"
    try:
        await smtp.connect(timeout=upstream.connect_timeout)
        stage = "EHLO"
        await _ehlo_or_helo(smtp, source.ehlo)
        if upstream.tls is TlsMode.STARTTLS:
            if not smtp.supports_extension("starttls"):
                raise SessionError(
                    outcome.tls_unavailable(
                        f"STARTTLS is required for upstream {upstream.id} but {upstream.host} "
                        f"at {peer} does not offer it; not sending in plaintext"
                    )
                )
            stage = "STARTTLS"
            assert tls_context is not None
            await smtp.starttls(server_hostname=upstream.host, tls_context=tls_context)
            # RFC 3207 § 4.2: forget what we learnt before TLS and greet again.
            stage = "EHLO"
            await smtp.ehlo(hostname=source.ehlo)
        if upstream.auth == "xoauth2":
            stage = "AUTH"
            await authenticate_oauth(smtp, upstream, peer, tokens)
        elif upstream.username and upstream.auth != "none":
            stage = "AUTH"
            await _authenticate(smtp, upstream, peer)
    except SessionError as exc:
        _abandon(smtp, sock)
        logger.info("upstream %s: %s", upstream.id, exc.reply)
        raise
    except OAuthProblem as exc:
        _abandon(smtp, sock)
        logger.info("upstream %s: %s", upstream.id, exc.reply)
        raise SessionError(exc.reply) from exc
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        _abandon(smtp, sock)
        reply = error_reply(exc, upstream, peer, source.address, stage)
        throttled = isinstance(exc, aiosmtplib.SMTPResponseException) and outcome.is_throttled(
            reply
        )
        logger.info("upstream %s: %s failed: %s", upstream.id, stage, reply)
        raise SessionError(reply, throttled=throttled) from exc
    except BaseException:
        _abandon(smtp, sock)
        raise
    # aiosmtplib has read its last reply (EHLO or AUTH); the server sends nothing more
    # until we do, so no byte is lost in the hand-over.
    # (uvloop's transports do not subclass asyncio.Transport, hence the cast.)
    transport = cast(asyncio.Transport, smtp.transport)
    return Session(
        channel=Channel.take_over(transport),
        extensions=frozenset(smtp.esmtp_extensions),
        key=key,
        peer=peer,
        source=source.address,
    )


def _abandon(smtp: aiosmtplib.SMTP, sock: socket.socket) -> None:
    """Close a half-open session. Until aiosmtplib has a transport (e.g. the implicit TLS
    handshake failed), the socket is still ours to close; after that the transport owns it
    and closes it itself (closing it under the transport could race the selector)."""
    had_transport = smtp.transport is not None
    smtp.close()
    if not had_transport:
        sock.close()


async def _ehlo_or_helo(smtp: aiosmtplib.SMTP, name: str) -> None:
    """EHLO, falling back to HELO when the server refuses EHLO (RFC 5321 § 3.2)."""
    try:
        await smtp.ehlo(hostname=name)
    except aiosmtplib.SMTPHeloError as exc:
        if exc.code == 421 or not 500 <= exc.code < 600 or not smtp.is_connected:
            raise
        await smtp.helo(hostname=name)


async def _authenticate(smtp: aiosmtplib.SMTP, upstream: Upstream, peer: str) -> None:
    """AUTH PLAIN, or LOGIN when PLAIN is not offered. The password never leaves this call:
    replies quoted back are the server's, and our own texts name only the user."""
    username = upstream.username or ""
    password = upstream.password.reveal() if upstream.password is not None else ""
    offered = [m for m in ("plain", "login") if m in smtp.server_auth_methods]
    if not smtp.supports_extension("auth") or not offered:
        raise SessionError(
            outcome.synthesised(
                454,
                "4.7.0",
                f"{upstream.host} at {peer} does not offer AUTH PLAIN or LOGIN "
                f"(needed to log in as {username})",
            )
        )
    for index, mechanism in enumerate(offered):
        try:
            if mechanism == "plain":
                await smtp.auth_plain(username, password)
            else:
                await smtp.auth_login(username, password)
            return
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Only "mechanism not supported" moves on: a wrong password is not retried
            # with another mechanism (twice the failures, and lockouts on some servers).
            if exc.code != 504 or index == len(offered) - 1:
                raise
