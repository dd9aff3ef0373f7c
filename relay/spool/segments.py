"""Body segments: message bodies appended to segment files, written once, made durable by
the same group commit as their rows, and unlinked when their last message leaves.

A spool keeps its bodies under `bodies/` as numbered, append-only files (`<n>.seg`); a
message row says where its body is (`body_seg`, `body_off`, `size`). Only the spool's
writer thread appends: the puts of a batch write their bodies at the end of the open segment,
and before the batch's COMMIT the segment is fdatasync'ed (the directory too when the
segment is new), so a committed row always points at bytes on disk. A crash can leave bytes
that no committed row points at (a put whose transaction never committed): they are never
read, and go when their segment does. Segments are never appended to after a restart (a
new one is opened), so such a tail is harmless.

A segment is unlinked after the commit that deleted its last row (and is not the one being
written); a crash before the unlink leaves an orphan, removed at the next open. At open,
rows whose segment is missing or too short (the file was removed or cut by hand, or by
damage) are reported so the spool can quarantine them instead of failing each delivery.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("relay.spool")

SEGMENT_DIR = "bodies"
# A segment is closed for appends past this size; its file goes when its last body does.
SEGMENT_BYTES = 64 * 1024 * 1024
_NAME = re.compile(r"^([0-9]{8,})\.seg$")
# Buffers per pwritev (the kernel's UIO_MAXIOV); a batch has at most 512 puts anyway.
_IOV_MAX = 1024
# Bytes per pwritev, about: one call of a whole batch of 1 MB bodies (up to 64 MB) cost the
# writer 30% more CPU per message than a call per body (the kernel throttles a large dirtying
# write in the writer's own time); small bodies still go ~200 to a call.
_WRITE_BYTES = 1 << 20


class MissingBody(Exception):
    """A row's body is not where its row says (the segment is gone or shorter)."""


def segment_name(number: int) -> str:
    return f"{number:08d}.seg"


@dataclass(slots=True)
class SegmentStats:
    """Counters for tests and the benchmark (writer thread only)."""

    created: int = 0
    removed: int = 0
    syncs: int = 0


class Segments:
    """The body files of one spool directory. `append_many`, `released`, `before_commit`,
    `after_commit` and `after_failure` run on the writer thread only; `read` on any thread."""

    def __init__(self, directory: Path, *, segment_bytes: int | None = None) -> None:
        self.directory = directory / SEGMENT_DIR
        self.segment_bytes = SEGMENT_BYTES if segment_bytes is None else segment_bytes
        self.stats = SegmentStats()
        self._lock = threading.Lock()  # `bytes_on_disk` is read off the writer thread
        self._fd = -1
        self._number = 0  # the segment being written (0: none open yet)
        self._offset = 0
        self._next = 1
        self._dirty = False  # bytes appended since the last sync
        self._new_file = False  # a segment created since the last directory sync
        self._released: set[int] = set()  # segments that lost a row in this transaction
        self._empty: list[int] = []  # ... and have none left: unlinked after COMMIT
        self._bytes = 0  # bytes in every segment file
        self._live = 0  # bytes of the bodies committed rows point at (the size cap)
        self._delta = 0  # ... changed by the transaction under way

    # --- open: what is on disk ------------------------------------------------------------

    def files(self) -> dict[int, Path]:
        """Every segment file present, by number."""
        if not self.directory.is_dir():
            return {}
        out = {}
        for child in self.directory.iterdir():
            m = _NAME.match(child.name)
            if m:
                out[int(m.group(1))] = child
        return out

    def open(self, conn: sqlite3.Connection) -> list[tuple[int, str]]:
        """Before the writer starts: remove orphan segments, count the bytes kept, choose
        the next segment number, and return (rowid, reason) of every row whose body is
        missing or cut short (for quarantine)."""
        self.directory.mkdir(exist_ok=True)
        present = self.files()
        sizes = {n: p.stat().st_size for n, p in present.items()}
        referenced: dict[int, int] = {}
        live = 0
        for seg, end, total in conn.execute(
            "SELECT body_seg, max(body_off + size), total(size) FROM messages"
            " INDEXED BY messages_body WHERE body_seg IS NOT NULL GROUP BY body_seg"
        ):
            referenced[int(seg)] = int(end)
            live += int(total)
        damaged: list[tuple[int, str]] = []
        for seg, end in referenced.items():
            size = sizes.get(seg)
            if size is not None and size >= end:
                continue
            why = (
                f"its body segment {segment_name(seg)} is missing"
                if size is None
                else f"its body segment {segment_name(seg)} is cut short ({size} < {end} bytes)"
            )
            for (rowid,) in conn.execute(
                "SELECT id FROM messages INDEXED BY messages_body"
                " WHERE body_seg = ? AND body_off + size > ?",
                (seg, -1 if size is None else size),
            ):
                damaged.append((int(rowid), why))
        for seg, path in present.items():
            if seg not in referenced:
                path.unlink(missing_ok=True)
                sizes.pop(seg)
                log.info("spool: removed body segment %s (no message refers to it)", path.name)
        self._bytes = sum(sizes.values())
        self._live = live
        self._next = max([*present, *referenced, 0]) + 1
        fsync_dir(self.directory)
        return damaged

    # --- writer thread --------------------------------------------------------------------

    def append_many(self, bodies: Sequence[bytes]) -> list[tuple[int, int]]:
        """Write each body at the end of the open segment, in order; their (segment, offset).
        Durable only after `before_commit`. One `pwritev` for as many as fit in _WRITE_BYTES
        of one segment (one GIL hand-over instead of one per small body: relay/spool/bulk.py).
        OSError (no space, …) leaves the segment usable: the next append overwrites whatever
        part was written."""
        places: list[tuple[int, int]] = []
        i = 0
        while i < len(bodies):
            if self._fd < 0 or self._offset >= self.segment_bytes:
                self._roll()
            start = end = self._offset
            j = i
            # A body goes in while the segment is short of its size (it is closed past it)
            # and if the call stays within _WRITE_BYTES (or it is the call's first).
            while (j < len(bodies) and end < self.segment_bytes and j - i < _IOV_MAX
                   and (j == i or end - start + len(bodies[j]) <= _WRITE_BYTES)):
                places.append((self._number, end))
                end += len(bodies[j])
                j += 1
            _pwrite_all(self._fd, bodies[i:j], start)
            self._offset = end
            with self._lock:
                self._bytes += end - start
            self._dirty = True
            i = j
        return places

    def stored(self, size: int) -> None:
        """A row pointing at an appended body of `size` bytes is in the transaction (the
        last step of its operation: nothing after it can roll the row back alone)."""
        self._delta += size

    def released(self, segment: int | None, size: int = 0) -> None:
        """A row pointing at `size` bytes of `segment` was deleted in the current
        transaction (the last step of its operation)."""
        if segment is not None:
            self._released.add(segment)
            self._delta -= size

    @property
    def live_bytes(self) -> int:
        """Bytes of the bodies that rows point at, this transaction's changes included
        (writer thread); dead bytes in segments not yet removed are not counted."""
        return self._live + self._delta

    def before_commit(self, conn: sqlite3.Connection) -> None:
        """Make this batch's bodies durable (before the rows that point at them commit),
        and find the released segments that no row refers to any more."""
        if self._dirty:
            os.fdatasync(self._fd)
            self._dirty = False
            self.stats.syncs += 1
        if self._new_file:
            fsync_dir(self.directory)
            self._new_file = False
        self._empty = [
            seg
            for seg in self._released
            if seg != self._number
            and conn.execute(
                "SELECT 1 FROM messages INDEXED BY messages_body WHERE body_seg = ? LIMIT 1",
                (seg,),
            ).fetchone()
            is None
        ]
        self._released.clear()

    def after_commit(self) -> None:
        """Unlink the segments the committed transaction emptied."""
        self._live += self._delta
        self._delta = 0
        for seg in self._empty:
            path = self.directory / segment_name(seg)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:  # left for the orphan sweep at the next open
                log.warning("spool: could not remove body segment %s: %s", path, exc)
                continue
            with self._lock:
                self._bytes -= size
            self.stats.removed += 1
        self._empty = []

    def after_failure(self) -> None:
        """The transaction was rolled back: its deletions did not happen."""
        self._delta = 0
        self._released.clear()
        self._empty = []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _roll(self) -> None:
        """Close the full (or no) segment and start the next one."""
        if self._fd >= 0:
            if self._dirty:  # its last bytes must be durable before it leaves our hands
                os.fdatasync(self._fd)
                self._dirty = False
            os.close(self._fd)
            self._fd = -1
            # The closed segment may already hold no live body (all delivered): check it
            # at the next commit like any released one.
            self._released.add(self._number)
        number = self._next
        fd = os.open(
            self.directory / segment_name(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
        )
        self._next = number + 1
        self._fd, self._number, self._offset = fd, number, 0
        self._new_file = True
        self.stats.created += 1

    # --- any thread -----------------------------------------------------------------------

    @property
    def bytes_on_disk(self) -> int:
        with self._lock:
            return self._bytes

    def read(self, segment: int, offset: int, size: int) -> bytes:
        """The body at `offset` of `segment`; MissingBody when it is not all there."""
        path = self.directory / segment_name(segment)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise MissingBody(f"body segment {path.name} is missing") from None
        try:
            data = os.pread(fd, size, offset)
            while len(data) < size:  # pread may return less than asked for
                more = os.pread(fd, size - len(data), offset + len(data))
                if not more:
                    raise MissingBody(f"body segment {path.name} ends before {offset + size}")
                data += more
        finally:
            os.close(fd)
        return data


def _pwrite_all(fd: int, bodies: Sequence[bytes], offset: int) -> None:
    """Write the bodies one after the other from `offset`, whatever a call writes short."""
    written = os.pwritev(fd, bodies, offset)
    for body in bodies:  # a short write (rare on a regular file): the rest one by one
        if written >= len(body):
            written -= len(body)
            offset += len(body)
            continue
        view = memoryview(body)[written:]
        offset += written
        written = 0
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


def fsync_dir(path: Path) -> None:
    """Make renames and file creations in a directory durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
