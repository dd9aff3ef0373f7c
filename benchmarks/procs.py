"""Process accounting from /proc: CPU of a process tree (including reaped children) and RSS.

Linux's /proc/PID/stat carries utime/stime of the process (all its threads) and
cutime/cstime of every child it has waited for. A daemon that recycles worker processes
(Postfix's master reaps smtpd, cleanup, smtp ...) therefore shows the CPU of its dead
workers in its cutime/cstime, and the live ones are summed from their own stat files.
Sampled at the start and at the end of a measured window, the difference is the CPU the
tree spent in that window.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces: split after the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def children_of() -> dict[int, list[int]]:
    """ppid -> pids, for every process on the machine."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is None:
            continue
        out.setdefault(int(f[1]), []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    tree = children_of()
    out: list[int] = []
    todo = list(tree.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """user+sys seconds of `pid` plus the children it reaped; with `tree`, plus every live
    descendant (and what those reaped)."""
    total = 0
    for p in [pid, *(descendants(pid) if tree else [])]:
        f = _stat_fields(p)
        if f is None:
            continue
        # Fields after the name: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / TICK


def rss_bytes(pid: int, *, tree: bool = False) -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes from /proc/PID/status (VmRSS, VmHWM), summed over
    the tree when asked."""
    cur = peak = 0
    for p in [pid, *(descendants(pid) if tree else [])]:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                cur += int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak += int(line.split()[1]) * 1024
    return cur, peak


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (bind to 0, read it back, close)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port below the kernel's ephemeral range that nobody listens on: an upstream
    that is "down". (Inside the range, one of many connection attempts can get that very
    port as its source and connect to itself: TCP simultaneous open.)"""
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(10_000, max(10_001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The mount type holding `path` (tmpfs would make fsync free and the figures void)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mnt = parts[1]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def thread_cpu(pid: int) -> dict[int, float]:
    """user+sys seconds per thread (tid -> seconds); the main thread's tid is the pid."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue
        f = raw[raw.rindex(")") + 2 :].split()
        out[int(tid)] = (int(f[11]) + int(f[12])) / TICK
    return out


def loop_threads_cpu(pid: int) -> dict[int, float]:
    """user+sys seconds of the main thread (the event loop) of `pid` and of each live
    descendant (a relay with workers: the supervisor and every worker), by pid."""
    return {p: thread_cpu(p).get(p, 0.0) for p in [pid, *descendants(pid)]}


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of the whole machine; iowait counts as busy (a disk still
    writing the last run's data is not a settled machine)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3], sum(fields[:8])


def settle(*, idle: float = 0.9, window: float = 0.5, limit: float = 30.0) -> float:
    """Flush dirty pages, then wait until the machine has been at least `idle` idle over
    one `window` (at most `limit` seconds): each run then starts from the same quiet
    machine, whichever MTA ran before it. Returns the seconds waited."""
    t0 = time.monotonic()
    os.sync()
    while time.monotonic() - t0 < limit:
        i0, n0 = _cpu_times()
        time.sleep(window)
        i1, n1 = _cpu_times()
        if n1 > n0 and (i1 - i0) / (n1 - n0) >= idle:
            break
    return time.monotonic() - t0
