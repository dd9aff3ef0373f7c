"""Whether the spool can write: "full" from the first write that failed for lack of space
until the next one that commits. While it is full, clients get 451 4.3.0 and queued mail
keeps its last recorded state (a retry whose outcome cannot be written is simply tried
again). The operator is told once, clearly, and again at most every `WARN_EVERY` seconds,
instead of a line (or a traceback) per refused message; the admin API's /readyz and the
`relay_spool_full` gauge read `reason`.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("relay.spool")

WARN_EVERY = 60.0
# SQLite's "database or disk is full", and the file system's own words for it.
_FULL_NAMES = frozenset({"SQLITE_FULL"})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_full(exc: BaseException | None) -> bool:
    """True when `exc` (or an error it was raised from) says there is no space left."""
    seen = exc
    for _ in range(8):  # bounded walk of the cause chain
        if seen is None:
            return False
        if getattr(seen, "sqlite_errorname", None) in _FULL_NAMES:
            return True
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class SpoolHealth:
    """Written by the spool's writer thread, read by the event loop (a lock keeps the
    pair of fields consistent)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._why = ""
        self._failed = 0
        self._warned_at = float("-inf")

    @property
    def reason(self) -> str | None:
        """None while writes succeed; else what the operator should know."""
        with self._lock:
            if self._since is None:
                return None
            return (
                f"spool full since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self._since))}"
                f" ({self._why}); new mail is answered 451 until space returns"
            )

    def full(self, why: str, operations: int) -> None:
        """A batch of `operations` failed for lack of space."""
        now = self._clock()
        with self._lock:
            if self._since is None:
                self._since = now
            self._why = why
            self._failed += operations
            warn = now - self._warned_at >= WARN_EVERY
            if warn:
                self._warned_at = now
            failed = self._failed
        if warn:
            log.warning(
                "spool is full (%s): new mail is answered 451 4.3.0 and queued mail keeps its"
                " last state until space returns; %d write(s) refused so far. Free space on"
                " the spool's file system (or raise its size limit).",
                why,
                failed,
            )

    def committed(self) -> None:
        """A write committed: the spool has room (again)."""
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self._since = self._since, None
            failed, self._failed = self._failed, 0
            self._warned_at = float("-inf")
        if since is not None:
            log.warning(
                "spool has room again after %.0f s; %d write(s) were refused meanwhile",
                self._clock() - since,
                failed,
            )
