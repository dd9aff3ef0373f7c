"""Issue 12, finding 8: `relay check` warns about an upstream's missing credential only when
mail can be routed to that upstream, at the line that routes it there; the built-in presets
that nothing uses need no credential, and an admin API left at its defaults needs no token.
The README's quick start is checked as printed there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK_START = re.compile(r"cat > /tmp/relay-demo/relay.yaml <<'YAML'\n(.*?)\nYAML\n", re.S)


def check(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SENDGRID", "MAILJET", "RELAY_"))}
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", "check", *extra, "-c", "."],
        cwd=directory, env=env, capture_output=True, text=True, timeout=30,
    )


def test_the_readme_quick_start_checks_clean_and_strict(tmp_path: Path) -> None:
    match = QUICK_START.search((REPO / "README.md").read_text())
    assert match is not None, "the README's quick start no longer writes relay.yaml this way"
    (tmp_path / "relay.yaml").write_text(match.group(1) + "\n")
    done = check(tmp_path, "--strict")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no SENDGRID_API_KEY, MAILJET_* or admin token warnings
    assert "relay.yaml: OK" in done.stdout


def test_a_used_preset_is_warned_at_the_line_that_routes_to_it(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_text(
        "listeners: [{address: 127.0.0.1, port: 2525}]\n"
        "upstreams:\n"
        "  sink: {host: 127.0.0.1, port: 2526, tls: none, allow_plaintext: true}\n"
        "default_upstream: sink\n"
    )
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "acme.yaml").write_text(
        "org: acme\n"
        "domains: [acme.example]\n"
        "members:\n"
        "  anna@acme.example:\n"
        "    upstream: mailjet\n"
        "upstream: sendgrid\n"
    )
    done = check(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "warning: policies/acme.yaml:5: upstream 'mailjet' (used by account"
        " 'anna@acme.example'): environment variable MAILJET_API_KEY is not set;"
        " its mail will wait in the queue",
        "warning: policies/acme.yaml:6: upstream 'sendgrid' (used by organisation 'acme'):"
        " environment variable SENDGRID_API_KEY is not set; its mail will wait in the queue",
    ]


def test_the_implicit_default_upstream_is_used_and_warned(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_text("listeners: [{address: 127.0.0.1, port: 2525}]\n")
    done = check(tmp_path, "--strict")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "warning: relay.yaml:1: upstream 'sendgrid' (used by default_upstream, which is not"
        " set): environment variable SENDGRID_API_KEY is not set; its mail will wait in the"
        " queue"
    ]
