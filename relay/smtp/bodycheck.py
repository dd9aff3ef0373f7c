"""DATA content checks (pure): message size, line length (RFC 5321 § 4.5.3.1.6), bare CR
or LF (SMTP smuggling) and NUL, with the reply a line-by-line reader would give for the
first offending line."""

from __future__ import annotations

from types import ModuleType

from relay.smtp.replies import R_BARE_NEWLINE, R_LINE_TOO_LONG, R_NUL, R_TOO_BIG

# The line scan splits the body in windows of about this size (bounded extra memory).
_SPLIT_WINDOW = 1 << 18
# From this size on, the screen runs as numpy array operations (one compare per byte
# class, one gather, one difference of line-end positions): 33 µs instead of 192 µs at 100
# KB, 0.3 instead of 1.9 ms at 1 MB; below it both take ~10 µs (benchmarks/RESULTS.md § 13).
VECTOR_FROM = 16_384


def vector_scan() -> ModuleType:
    """numpy, imported on first use (~60 ms: the listener loads it when it starts, so that
    neither the first large message nor a CLI command that never checks a body pays)."""
    import numpy

    return numpy


def _breaks_and_longest(content: bytes | bytearray) -> tuple[int, int]:
    """(line breaks, longest line) of `content`: every CR, LF or CRLF ends a line (as
    `bytes.splitlines` has it), line ends excluded. C-speed splits in windows that end just
    after an LF, so that a CRLF is never cut in two and a huge message does not double in
    memory as a list of lines."""
    n = len(content)
    breaks = 0
    longest = 0
    start = 0
    while start < n:
        end = content.find(b"\n", start + _SPLIT_WINDOW) + 1 if n - start > _SPLIT_WINDOW else 0
        if end <= 0:
            end = n
        lines = content[start:end].splitlines()
        if lines:
            breaks += len(lines) if content[end - 1] in b"\r\n" else len(lines) - 1
            longest = max(longest, max(map(len, lines)))
        start = end
    return breaks, longest


def clean_by_splitting(lines: bytes | bytearray, max_line: int) -> bool:
    """The screen with `bytes` methods: as many CRs as LFs as line breaks means every line
    ends in CRLF (no bare CR or LF: a bare one is a break that adds to one count only), and
    the longest line (line end excluded) is at most `max_line` - 2 (stuffed: never shorter
    than unstuffed)."""
    crs = lines.count(b"\r")
    if crs != lines.count(b"\n"):
        return False
    breaks, longest = _breaks_and_longest(lines)
    return breaks == crs and longest <= max_line - 2


def clean_by_vector(lines: bytes | bytearray, max_line: int) -> bool:
    """The same screen as numpy array operations: every LF has a CR just before it, there
    are no other CRs, and no two LFs (nor the start and the first, nor the last and the end)
    are further apart than a `max_line` - 2 line and its CRLF allow."""
    return _vector_scan(lines, max_line)[0]


def _vector_scan(lines: bytes | bytearray, max_line: int) -> tuple[bool, bool]:
    """(clean, a line after the first starts with "."): the screen, and from the same LF
    positions whether the body has a dot-stuffed line."""
    np = vector_scan()
    octets = np.frombuffer(lines, dtype=np.uint8)
    lfs = np.flatnonzero(octets == 10)
    n = len(octets)
    if len(lfs) == 0:
        return n <= max_line - 2 and b"\r" not in lines, False
    dotted = bool((octets[lfs[:-1] + 1] == 46).any()) or (
        int(lfs[-1]) + 1 < n and bool(octets[int(lfs[-1]) + 1] == 46)
    )
    if lfs[0] == 0 or np.count_nonzero(octets == 13) != len(lfs):
        return False, dotted
    if not bool((octets[lfs - 1] == 13).all()):
        return False, dotted
    longest = max(int(lfs[0]) - 1, n - 1 - int(lfs[-1]))  # the first and a last open line
    if len(lfs) > 1:
        longest = max(longest, int(np.diff(lfs).max()) - 2)
    return longest <= max_line - 2, dotted


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


def _screen(lines: bytes | bytearray, max_line: int, limit: int) -> tuple[bool, bool | None]:
    """(clean, whether a line was dot-stuffed when the screen found that out on the way):
    whole-buffer scans in C, as numpy array operations from VECTOR_FROM bytes on. A NUL is
    never clean: a lenient next hop may end a line or the data at one."""
    if len(lines) - 2 > limit or b"\x00" in lines:
        return False, None
    if len(lines) >= VECTOR_FROM:
        return _vector_scan(lines, max_line)
    return clean_by_splitting(lines, max_line), None


def body_problem(lines: bytes | bytearray, max_line: int, limit: int) -> str | None:
    """The refusal for dot-stuffed DATA `lines` (the DATA line's CRLF, then whole CRLF-ended
    lines), or None. Only a body the screen does not pass goes through the line-by-line
    `first_problem` for the exact reply."""
    clean, _ = _screen(lines, max_line, limit)
    return None if clean else first_problem(bytes(lines[2:]), max_line, limit)


def examine(lines: bytes | bytearray, max_line: int, limit: int) -> tuple[str | None, bool]:
    """(the refusal or None, whether a line starts with "." and so was dot-stuffed) for
    DATA `lines` as `body_problem` takes them. A large clean body answers both from one
    numpy pass over its line ends."""
    clean, dotted = _screen(lines, max_line, limit)
    if clean and dotted is not None:
        return None, dotted
    problem = None if clean else first_problem(bytes(lines[2:]), max_line, limit)
    return problem, b"\r\n." in lines
