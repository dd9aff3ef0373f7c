"""Building RFC 3464 delivery status notifications for failed recipients (pure: bytes out).

A DSN is a multipart/report (RFC 6522) with three parts: a human-readable explanation that
quotes the upstream's own reply, a machine-readable message/delivery-status, and the
original message's headers (text/rfc822-headers). Lines end in CRLF and never exceed the
998 octets RFC 5322 § 2.1.1 allows.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

from relay.core.model import Reply

CRLF = b"\r\n"
MAX_LINE = 998  # RFC 5322 § 2.1.1, excluding the CRLF
FOLD_AT = 78  # RFC 5322 § 2.1.1 "SHOULD": fold field values to this width where possible

KIND_BOUNCED = "bounced"
KIND_EXPIRED = "expired"


def should_send_dsn(sender: str, is_dsn: bool) -> bool:
    """Never to the null reverse-path, and never about a DSN (RFC 3464 § 2 / RFC 5321
    § 4.5.5: notifications are sent with a null sender, and must not trigger more)."""
    return bool(sender) and not is_dsn


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _status(kind: str, reply: Reply) -> str:
    """The RFC 3463 status for an Action: failed recipient; always of class 5."""
    if kind == KIND_EXPIRED:
        return "5.4.7"  # delivery time expired (RFC 3463 § 3.5)
    if reply.enhanced and reply.enhanced.startswith("5."):
        return reply.enhanced
    return "5.0.0"


def _original_recipient(rcpt: str, orcpts: Mapping[str, str] | None) -> list[str]:
    """RFC 3464 § 2.3.1: the ORCPT the client gave, "addr-type; address"."""
    orcpt = (orcpts or {}).get(rcpt)
    if not orcpt:
        return []
    kind, _, address = orcpt.partition(";")
    return _field("Original-Recipient", f"{kind}; {address}")


def _address_type(address: str) -> str:
    # RFC 6533 § 3: non-ASCII addresses use the "utf-8" address type.
    return "rfc822" if address.isascii() else "utf-8"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _field(name: str, value: str) -> list[str]:
    """A header-style field, folded at spaces (RFC 5322 § 2.2.3), hard-split if it must."""
    words = _one_line(value).split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if not word:
            continue
        if current != f"{name}:" and len(current) + 1 + len(word) > FOLD_AT:
            lines.append(current)
            current = " " + word
        else:
            current = f"{current} {word}"
    lines.append(current)
    return [piece for line in lines for piece in _hard_split(line, continuation=" ")]


def _hard_split(line: str, *, continuation: str) -> list[str]:
    """Split a line longer than MAX_LINE octets (counted as UTF-8), continuing with `continuation`."""
    out: list[str] = []
    while len(line.encode()) > MAX_LINE:
        cut = MAX_LINE
        while len(line[:cut].encode()) > MAX_LINE:
            cut -= 1
        out.append(line[:cut])
        line = continuation + line[cut:]
    out.append(line)
    return out


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        _one_line(text),
        width=76,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


def _lines(lines: Iterable[str]) -> bytes:
    return b"".join(line.encode("utf-8") + CRLF for line in lines)


def _header_block(original_headers: bytes) -> bytes:
    """The original header section only, CRLF-normalised, long lines folded."""
    text = original_headers.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    head, _, _ = text.partition(b"\n\n")  # a caller that passed the whole message: cut the body
    head = head.strip(b"\n")
    if not head:
        return b""
    out: list[bytes] = []
    for raw in head.split(b"\n"):
        while len(raw) > MAX_LINE:
            out.append(raw[:MAX_LINE])
            raw = b" " + raw[MAX_LINE:]  # folding: a continuation line starts with space
        out.append(raw)
    return b"".join(line + CRLF for line in out)


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    queue_id: str,
    arrival: float,
    failures: Sequence[tuple[str, str, Reply]],
    original_headers: bytes,
    now: float,
    envid: str | None = None,
    original_recipients: Mapping[str, str] | None = None,
) -> bytes:
    """A complete DSN message (headers and body) for the recipients in `failures`.

    `failures` holds (recipient, kind, last reply) with kind "bounced" (the upstream
    refused it permanently) or "expired" (it stayed deferred past the maximum age).
    `envid` (the client's ENVID) and `original_recipients` (recipient -> its ORCPT, as
    "addr-type;address") are decoded text (RFC 3461 § 4: the xtext encoding removed).
    """
    if not original_sender:
        raise ValueError("a DSN is never sent to the null sender")
    if not failures:
        raise ValueError("a DSN needs at least one failed recipient")
    for _, kind, _ in failures:
        if kind not in (KIND_BOUNCED, KIND_EXPIRED):
            raise ValueError(f"unknown failure kind {kind!r}")

    token = secrets.token_hex(8)
    safe_id = re.sub(r"[^A-Za-z0-9.-]", "_", queue_id)[:64]  # for Message-ID and boundary
    boundary = f"=_dsn_{safe_id}_{token}"
    utf8 = not original_sender.isascii() or any(not r.isascii() for r, _, _ in failures)

    headers: list[str] = [
        *_field("From", f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
        *_field("To", f"<{original_sender}>"),
        *_field("Subject", "Undelivered Mail Returned to Sender"),
        *_field("Date", _date(now)),
        *_field("Message-ID", f"<{safe_id}.{int(now)}.{token}@{reporting_mta}>"),
        "Auto-Submitted: auto-replied",  # RFC 3834 § 5
        "MIME-Version: 1.0",
        *_field(
            "Content-Type",
            f"multipart/report; report-type={'global-' if utf8 else ''}delivery-status; "
            f'boundary="{boundary}"',
        ),
    ]

    human = [
        f"This is the mail system at {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        f"Queue ID: {queue_id}, received {_date(arrival)}.",
        "",
    ]
    for rcpt, kind, reply in failures:
        human.extend(_wrap(f"<{rcpt}>:", ""))
        if kind == KIND_EXPIRED:
            human.extend(
                _wrap(
                    "could not be delivered in time and was given up; the last attempt "
                    "got this reply:",
                    "    ",
                )
            )
        else:
            human.extend(_wrap("was refused by the receiving server, which said:", "    "))
        human.extend(_wrap(str(reply), "        "))
        human.append("")

    status: list[str] = [
        *(_field("Original-Envelope-Id", envid) if envid else []),  # RFC 3464 § 2.2.1
        *_field("Reporting-MTA", f"dns; {reporting_mta}"),
        *_field("X-Relay-Queue-ID", queue_id),
        *_field("Arrival-Date", _date(arrival)),
    ]
    for rcpt, kind, reply in failures:
        status.extend(
            [
                "",  # per-recipient groups are separated by a blank line (RFC 3464 § 2.1)
                *_original_recipient(rcpt, original_recipients),
                *_field("Final-Recipient", f"{_address_type(rcpt)}; {rcpt}"),
                "Action: failed",
                f"Status: {_status(kind, reply)}",
                *_field("Diagnostic-Code", f"smtp; {reply.code} {reply.text}"),
                *_field("Last-Attempt-Date", _date(now)),
            ]
        )

    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    body = b"".join(
        [
            _lines(headers),
            CRLF,
            _lines(["This is a MIME-encapsulated delivery status notification.", ""]),
            _lines(
                [
                    f"--{boundary}",
                    "Content-Type: text/plain; charset=utf-8",
                    "Content-Transfer-Encoding: 8bit",
                    "Content-Description: Notification",
                    "",
                ]
            ),
            _lines(human),
            _lines(
                [
                    f"--{boundary}",
                    f"Content-Type: {status_type}",
                    "Content-Description: Delivery report",
                    "",
                ]
            ),
            _lines(status),
            CRLF,
            _lines(
                [
                    f"--{boundary}",
                    "Content-Type: text/rfc822-headers",
                    "Content-Description: Undelivered message headers",
                    "",
                ]
            ),
            _header_block(original_headers),
            CRLF,  # the CRLF before a boundary belongs to the boundary (RFC 2046 § 5.1.1)
            _lines([f"--{boundary}--"]),
        ]
    )
    return body
