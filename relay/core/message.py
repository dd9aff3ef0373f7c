"""Pure byte-level header handling of an accepted message: read and strip the trusted tag
headers. Only the header block is parsed; the body is spliced, never parsed as MIME.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def take_headers(data: bytes, names: Sequence[str]) -> tuple[list[str | None], bytes]:
    """The first unfolded value of each header in `names` (case-insensitive; None where
    absent) and the message without any header so called, from one parse of the header
    block. The message is returned as is (same object) when none is present."""
    keys = [n.lower().encode("ascii") for n in names]
    end = header_end(data)
    block = data[:end]
    lower = block.lower()
    if not any(k in lower for k in keys):  # most messages: no field can be called that
        return [None] * len(keys), data
    first: list[str | None] = [None] * len(keys)
    drop: list[tuple[int, int]] = []
    for fname, start, stop in _fields(block):
        if fname in keys:
            drop.append((start, stop))
            for i, key in enumerate(keys):
                if key == fname and first[i] is None:
                    raw = block[start:stop].split(b":", 1)[1]
                    first[i] = raw.replace(b"\r\n", b"").decode("utf-8", "replace").strip()
    return first, _without(data, block, drop)


def _without(data: bytes, block: bytes, drop: list[tuple[int, int]]) -> bytes:
    """`data` without the (start, end) ranges of its header `block`, in order."""
    if not drop:
        return data
    parts = []
    pos = 0
    for s, e in drop:
        parts.append(block[pos:s])
        pos = e
    parts.append(data[pos:])
    return b"".join(parts)
