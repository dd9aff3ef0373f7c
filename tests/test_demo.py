"""`make demo` (scripts/demo.py) for real: a sink, `relay serve`, one message, a clean stop."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_the_demo_delivers_one_message_and_leaves_nothing_running() -> None:
    out = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    queued = re.search(r"the relay answered 250 2\.0\.0 OK: queued as (\S+)", out.stdout)
    assert queued is not None, out.stdout
    qid = queued.group(1)
    assert "| Subject: hello from the demo" in out.stdout
    assert re.search(rf"delivered {qid}  250 2\.0\.0 OK: accepted by the demo sink", out.stdout)
    directory = re.search(r"config: (\S+)/relay\.yaml", out.stdout)
    assert directory is not None and not Path(directory.group(1)).exists()  # cleaned up
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert directory.group(1) not in ps  # no relay left running on the demo's config
