"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2) that a load
balancer sends before anything else on a connection, naming the real client (pure parsing).

Our own parser, not a library's: the SMTP server reads one input buffer per connection in an
`asyncio.Protocol` (relay/smtp/session.py), and the parsers at hand are built around a stream
reader (aiosmtpd's `proxy_protocol.get_proxy`, tied to its SMTP class and a test-only
dependency here) or wrap the whole asyncio server (the `proxy-protocol` package); the format
is small and fixed, and strict, bounded parsing of our own buffer is the part that matters.
tests/test_proxy_protocol.py checks this parser against aiosmtpd's as the reference.

Only TCP over IPv4/IPv6 yields an address. A v1 "UNKNOWN" or v2 LOCAL header (a balancer's
health check) and v2 UNSPEC/UNIX yield none: the connection is the balancer's own. Anything
malformed, or a v2 header longer than `MAX_V2_LENGTH`, is a `ProxyError`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec § 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V2_LENGTH = 4096  # addresses + TLVs: far more than any balancer sends (spec allows 65535)


class ProxyError(ValueError):
    """Not a valid PROXY protocol header (the text is safe to log)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int  # bytes of the buffer the header used
    source: tuple[str, int] | None  # the real client (address, port); None: the balancer's own


def parse(buf: bytes | bytearray) -> ProxyHeader | None:
    """The header at the start of `buf`, or None while it is incomplete."""
    head = bytes(buf[:12])
    if not head:
        return None
    if V2_SIGNATURE.startswith(head):  # "\r..." (v1 starts with "P": never both)
        return None if len(head) < 12 else _parse_v2(buf)
    if V1_PREFIX.startswith(head[:6]):
        return None if len(head) < 6 else _parse_v1(buf)
    raise ProxyError("no PROXY protocol header")


def _parse_v1(buf: bytes | bytearray) -> ProxyHeader | None:
    end = bytes(buf[:V1_MAX]).find(b"\r\n")
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyError("PROXY v1 line too long")
        return None
    try:
        line = bytes(buf[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(end + 2, None)  # spec § 2.1: the rest of the line is ignored
    if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed PROXY v1 line")
    version = 4 if parts[1] == "TCP4" else 6
    source = _address(parts[2], version)
    _address(parts[3], version)
    port = _port(parts[4])
    _port(parts[5])
    return ProxyHeader(end + 2, (source, port))


def _address(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError("bad address in PROXY v1 line") from None
    if ip.version != version:
        raise ProxyError("address family does not match the PROXY v1 protocol")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyError("bad port in PROXY v1 line")
    port = int(text)
    if port > 65535:
        raise ProxyError("bad port in PROXY v1 line")
    return port


def _parse_v2(buf: bytes | bytearray) -> ProxyHeader | None:
    if len(buf) < 16:
        return None
    ver_cmd, family, length = struct.unpack("!BBH", bytes(buf[12:16]))
    if ver_cmd >> 4 != 2:
        raise ProxyError("unsupported PROXY protocol version")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyError("unknown PROXY v2 command")
    if length > MAX_V2_LENGTH:
        raise ProxyError("PROXY v2 header too long")
    if len(buf) < 16 + length:
        return None
    body = bytes(buf[16 : 16 + length])
    total = 16 + length
    if command == 0:  # LOCAL: the balancer's own connection (health check)
        return ProxyHeader(total, None)
    if family == 0x11:  # TCP over IPv4: src, dst, sport, dport
        if length < 12:
            raise ProxyError("PROXY v2 IPv4 addresses truncated")
        src = str(ipaddress.IPv4Address(body[0:4]))
        port = struct.unpack("!H", body[8:10])[0]
        return ProxyHeader(total, (src, port))
    if family == 0x21:  # TCP over IPv6
        if length < 36:
            raise ProxyError("PROXY v2 IPv6 addresses truncated")
        ip6 = ipaddress.IPv6Address(body[0:16])
        src = str(ip6.ipv4_mapped) if ip6.ipv4_mapped is not None else str(ip6)
        port = struct.unpack("!H", body[32:34])[0]
        return ProxyHeader(total, (src, port))
    if family in (0x00, 0x31):  # UNSPEC, UNIX stream: no client address to use
        return ProxyHeader(total, None)
    raise ProxyError("PROXY v2 transport is not TCP")
