"""Command-line syntax of our SMTP server (pure): peer addresses, keywords, HELO names,
base64, MAIL parameters and the SASL PLAIN response."""

from __future__ import annotations

import base64
import binascii
import ipaddress

from relay.core.errors import PermanentError
from relay.smtp.addresses import AddressSyntaxError


def peer_address(peername: object) -> tuple[str, int]:
    if not isinstance(peername, tuple) or len(peername) < 2:
        return "", 0
    host = str(peername[0])
    if ":" not in host:
        return host, int(peername[1])  # the kernel's dotted quad: already canonical
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; allowlists say a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(peername[1])


def strip_keyword(keyword: str, arg: str | None) -> str | None:
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword) :]


def valid_helo(arg: str | None) -> bool:
    # A domain or address literal (RFC 5321 § 4.1.1.1): printable ASCII, no spaces. It
    # goes into our Received header, so nothing else is accepted.
    return arg is not None and 0 < len(arg) <= 255 and all("!" <= c <= "~" for c in arg)


def b64decode(text: str | bytes) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def mail_params(params: dict[str, str | None], max_message_size: int) -> tuple[bool, bool]:
    """(smtputf8, body_8bit) from MAIL parameters; raises RelayError to refuse."""
    size = params.pop("SIZE", None)
    if size is not None:
        if not size.isdigit() or len(size) > 20:
            raise AddressSyntaxError("SIZE takes a number")
        if int(size) > max_message_size:
            raise PermanentError(
                "Message size exceeds fixed maximum message size", code=552, enhanced="5.3.4"
            )
    body = params.pop("BODY", "7BIT")
    if body is None or body.upper() not in ("7BIT", "8BITMIME"):
        raise AddressSyntaxError("BODY takes 7BIT or 8BITMIME")
    smtputf8 = "SMTPUTF8" in params
    if params.pop("SMTPUTF8", None) is not None:
        raise AddressSyntaxError("SMTPUTF8 takes no value")
    # RFC 4954 § 5: accepted from any client, and ignored (we do not trust it).
    params.pop("AUTH", None)
    if params:
        raise PermanentError(
            "MAIL parameters not recognized: " + " ".join(sorted(params)),
            code=555,
            enhanced="5.5.4",
        )
    return smtputf8, body.upper() == "8BITMIME" or smtputf8


def decode_plain(blob: bytes) -> tuple[str, str, str] | None:
    """(authzid, authcid, password) of a SASL PLAIN response (RFC 4616), None if malformed."""
    parts = blob.split(b"\x00")
    try:
        authz, user, password = (p.decode("utf-8") for p in parts)
    except (ValueError, UnicodeDecodeError):
        return None
    return authz, user, password
