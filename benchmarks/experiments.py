"""Run `relay` with candidate optimisations patched in, to A/B them in the benchmark before
anyone edits the real modules. Each patch is what the proposed change would do; none of this
is used outside the benchmark.

    .venv/bin/python benchmarks/run.py --skip-postfix \\
        --relay-command ".venv/bin/python benchmarks/experiments.py pool,quietlog,session"

- pool:     keep up to 20 idle upstream sessions per key (Deliverer max_idle_per_key; the
            proposal: the upstream's max_connections), instead of 4: no connect/EHLO/QUIT
            churn when 20 deliveries finish together.
- quietlog: the listener's per-message "queued" INFO line off (the mail log's `received`
            line already says it).
- session:  aiosmtpd's per-connection `inspect.getmembers(self)` (to find auth_* methods)
            answered from a per-class list of names.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any


def pool() -> None:
    from relay.delivery.deliverer import Deliverer

    defaults = Deliverer.__init__.__kwdefaults__
    assert defaults is not None and "max_idle_per_key" in defaults
    defaults["max_idle_per_key"] = 20


def quietlog() -> None:
    logging.getLogger("relay.listener").setLevel(logging.WARNING)


def session() -> None:
    import aiosmtpd.smtp as smtp

    names: dict[type, list[str]] = {}

    class Inspect:
        """inspect, except getmembers on an SMTP session: only auth_* (all aiosmtpd asks
        for), from a per-class list, bound to this instance."""

        def __getattr__(self, name: str) -> Any:
            return getattr(inspect, name)

        @staticmethod
        def getmembers(obj: Any) -> list[tuple[str, Any]]:
            if not isinstance(obj, smtp.SMTP):
                return inspect.getmembers(obj)
            cls = type(obj)
            if cls not in names:
                names[cls] = [n for n in dir(cls) if n.startswith("auth_")]
            return [(n, getattr(obj, n)) for n in names[cls]]

    setattr(smtp, "inspect", Inspect())  # noqa: B010 (the module attribute aiosmtpd reads)


PATCHES: dict[str, Callable[[], None]] = {"pool": pool, "quietlog": quietlog, "session": session}


def main() -> int:
    chosen = [p for p in sys.argv[1].split(",") if p and p != "none"]
    for name in chosen:
        PATCHES[name]()
    from relay.cli import main as relay_main

    return relay_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
