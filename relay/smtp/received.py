"""The Received: trace field our server prepends to every accepted message (RFC 5321 § 4.4)."""

from __future__ import annotations

import email.utils
import time


class DateCache:
    """RFC 5322 date for the Received header, formatted once per second."""

    second = 0
    text = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.text = second, email.utils.formatdate(second, localtime=True)
        return cls.text


def received_header(
    *,
    helo: str | None,
    peer_ip: str,
    hostname: str,
    extended: bool,
    smtputf8: bool,
    tls: bool,
    authenticated: bool,
) -> bytes:
    """RFC 5321 § 4.4 trace field; `with` keywords from RFC 3848 and RFC 6531."""
    literal = f"[IPv6:{peer_ip}]" if ":" in peer_ip else f"[{peer_ip}]"
    if not extended:
        protocol = "SMTP"
    else:
        protocol = "UTF8SMTP" if smtputf8 else "ESMTP"
        protocol += ("S" if tls else "") + ("A" if authenticated else "")
    return (
        f"Received: from {helo} ({literal})\r\n"
        f"\tby {hostname} (egress-relay) with {protocol};\r\n"
        f"\t{DateCache.now()}\r\n"
    ).encode("ascii")
