"""Run `relay` with candidate optimisations patched in, to A/B them in the benchmark before
anyone edits the real modules. Each patch is what the proposed change would do; none of this
is used outside the benchmark.

    .venv/bin/python benchmarks/run.py --skip-postfix \\
        --relay-command ".venv/bin/python benchmarks/experiments.py pool,quietlog"

- pool:     keep up to 20 idle upstream sessions per key (Deliverer max_idle_per_key; the
            proposal: the upstream's max_connections), instead of 4: no connect/EHLO/QUIT
            churn when 20 deliveries finish together.
- quietlog: the listener's per-message "queued" INFO line off (the mail log's `received`
            line already says it).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def pool() -> None:
    from relay.delivery.deliverer import Deliverer

    defaults = Deliverer.__init__.__kwdefaults__
    assert defaults is not None and "max_idle_per_key" in defaults
    defaults["max_idle_per_key"] = 20


def quietlog() -> None:
    logging.getLogger("relay.listener").setLevel(logging.WARNING)


PATCHES: dict[str, Callable[[], None]] = {"pool": pool, "quietlog": quietlog}


def main() -> int:
    chosen = [p for p in sys.argv[1].split(",") if p and p != "none"]
    for name in chosen:
        PATCHES[name]()
    from relay.cli import main as relay_main

    return relay_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
