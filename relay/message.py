"""Pure byte-level header handling of an accepted message: read and strip the trusted tag
headers, add our `Received:` trace header. Only the header block is touched; the body is
never copied more than once (we splice bytes, we do not parse MIME).
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterable

CRLF = b"\r\n"


def header_end(data: bytes) -> int:
    """Offset just past the blank line ending the header block (len(data) if none)."""
    if data.startswith(CRLF):
        return 2
    i = data.find(b"\r\n\r\n")
    return len(data) if i < 0 else i + 4


def _fields(block: bytes) -> list[tuple[bytes, int, int]]:
    """(lower-case name, start, end) for each field of the header block, folded lines included."""
    out: list[tuple[bytes, int, int]] = []
    pos = 0
    n = len(block)
    while pos < n:
        end = block.find(CRLF, pos)
        end = n if end < 0 else end + 2
        line = block[pos:end]
        if line in (CRLF, b""):
            break
        if line[:1] in (b" ", b"\t") and out:
            name, start, _ = out[-1]
            out[-1] = (name, start, end)  # RFC 5322 § 2.2.3 folding: continuation line
        else:
            colon = line.find(b":")
            name = line[:colon].strip().lower() if colon > 0 else b""
            out.append((name, pos, end))
        pos = end
    return out


def header_values(data: bytes, name: str) -> list[str]:
    """Unfolded values of every header called `name` (case-insensitive)."""
    end = header_end(data)
    block = data[:end]
    key = name.lower().encode("ascii")
    values = []
    for fname, start, stop in _fields(block):
        if fname == key:
            raw = block[start:stop].split(b":", 1)[1]
            values.append(raw.replace(b"\r\n", b"").decode("utf-8", "replace").strip())
    return values


def remove_headers(data: bytes, names: Iterable[str]) -> bytes:
    """The message without any header in `names`; unchanged (same object) if none present."""
    keys = {n.lower().encode("ascii") for n in names}
    end = header_end(data)
    block = data[:end]
    drop = [(s, e) for fname, s, e in _fields(block) if fname in keys]
    if not drop:
        return data
    parts = []
    pos = 0
    for s, e in drop:
        parts.append(block[pos:s])
        pos = e
    parts.append(data[pos:])
    return b"".join(parts)


def received_header(
    *, helo: str, client_ip: str, by: str, queue_id: str, tls: bool, auth: bool,
    recipient: str | None, now: float | None = None,
) -> bytes:
    """RFC 5321 § 4.4 trace field; protocol name per RFC 3848 (ESMTP, ESMTPS, ESMTPA, ESMTPSA)."""
    proto = "ESMTP" + ("S" if tls else "") + ("A" if auth else "")
    helo_clean = "".join(c for c in helo if c.isprintable() and c not in "()\\") or "unknown"
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    date = email.utils.formatdate(now if now is not None else time.time(), localtime=False)
    for_part = f"\r\n\tfor <{recipient}>" if recipient else ""
    return (
        f"Received: from {helo_clean} ([{ip}])\r\n\tby {by} (egress-relay) with {proto} id {queue_id}"
        f"{for_part};\r\n\t{date}\r\n"
    ).encode("utf-8", "replace")
