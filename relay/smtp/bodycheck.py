"""DATA content checks (pure): message size, line length (RFC 5321 § 4.5.3.1.6), bare CR
or LF (SMTP smuggling) and NUL, with the reply a line-by-line reader would give for the
first offending line."""

from __future__ import annotations

from relay.smtp.replies import R_BARE_NEWLINE, R_LINE_TOO_LONG, R_NUL, R_TOO_BIG

# Line-length checks split the body in windows of about this size (bounded extra memory).
_SPLIT_WINDOW = 1 << 18


def longest_line(content: bytes | bytearray) -> int:
    """The longest CRLF-separated line of `content`, CRLF excluded. C-speed splits, in
    windows so that a huge message does not double in memory as a list of lines."""
    n = len(content)
    longest = 0
    start = 0
    while start < n:
        end = content.find(b"\r\n", start + _SPLIT_WINDOW) if n - start > _SPLIT_WINDOW else -1
        if end < 0:
            end = n
        longest = max(longest, max(map(len, content[start:end].split(b"\r\n"))))
        start = end + 2
    return longest


def first_problem(lines: bytes, max_line: int, limit: int) -> str | None:
    """The refusal a line-by-line reader would give for dot-stuffed DATA `lines` (whole
    CRLF-ended lines, no end marker): the first offending line decides; within a line, its
    length, then the running size, then a bare CR or LF, then a NUL. Only the refusal path
    runs this."""
    size = 0
    for line in lines.split(b"\r\n")[:-1]:
        stuffed = len(line) + 2
        size += stuffed
        unstuffed = stuffed - 1 if line[:1] == b"." else stuffed  # RFC 5321 § 4.5.2
        if unstuffed > max_line:
            return R_LINE_TOO_LONG
        if size > limit:
            return R_TOO_BIG
        if b"\r" in line or b"\n" in line:
            return R_BARE_NEWLINE
        if b"\x00" in line:
            return R_NUL
    return None


def body_problem(lines: bytes | bytearray, max_line: int, limit: int) -> str | None:
    """The refusal for dot-stuffed DATA `lines` (the DATA line's CRLF, then whole CRLF-ended
    lines), or None. A few whole-buffer scans in C screen the body; only a body that
    fails them goes through the line-by-line `first_problem` for the exact reply."""
    crs = lines.count(b"\r")
    if (
        len(lines) - 2 <= limit
        and crs == lines.count(b"\n") == lines.count(b"\r\n")  # no bare CR, no bare LF
        and b"\x00" not in lines  # a lenient next hop may end a line or the data at a NUL
        and longest_line(lines) <= max_line - 2  # stuffed: never shorter than unstuffed
    ):
        return None
    return first_problem(bytes(lines[2:]), max_line, limit)
