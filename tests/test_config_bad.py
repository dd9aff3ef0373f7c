"""`relay check` on every folder of tests/bad_configs: exit 1 and exactly the expected errors.

Each case folder holds relay.yaml, maybe policies/*.yaml, and expected.txt. `relay check -c .`
runs with the case folder as working directory, so every reported path is relative to it
("relay.yaml:3: …", "policies/acme.yaml:5: …") and expected.txt is stable wherever the
repository lives. The errors come sorted by file, line and message, all at once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import ConfigErrors, load_config

BAD = Path(__file__).parent / "bad_configs"
CASES = sorted(p for p in BAD.iterdir() if p.is_dir())
ERROR_LINE = re.compile(r"^[^:\s]+:\d+: \S.*$")
# Values that the literal_password case writes in its YAML; none may ever be printed.
LITERALS = ("Hunter2-Pl41nText", "Hunter2-Adm1nToken", "Hunter2-P0licyPass")


def relay(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_there_is_a_case_for_every_kind_of_mistake() -> None:
    assert len(CASES) >= 20
    for case in CASES:
        expected = (case / "expected.txt").read_text()
        assert (case / "relay.yaml").is_file(), case.name
        assert expected.endswith("\n"), case.name
        for line in expected.splitlines():
            assert ERROR_LINE.match(line), f"{case.name}: {line!r} is not file:line: message"


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_relay_check_reports_exactly_the_expected_errors(case: Path) -> None:
    proc = relay("check", "-c", ".", cwd=case)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (case / "expected.txt").read_text()


def test_literal_passwords_never_appear_in_any_output() -> None:
    case = BAD / "literal_password"
    assert all(v in (case / "relay.yaml").read_text() + _policies(case) for v in LITERALS)
    outputs = [
        relay("check", "-c", ".", cwd=case),
        relay("check", "--strict", "-c", ".", cwd=case),
        relay("route", "-c", ".", "--sender", "x@acme.example", "--json", cwd=case),
        relay("egress-ips", "-c", ".", cwd=case),
    ]
    for proc in outputs:
        assert proc.returncode == 1
        assert "a password must be a reference" in proc.stderr
        for literal in LITERALS:
            assert literal not in proc.stdout + proc.stderr
    with pytest.raises(ConfigErrors) as caught:
        load_config(case, environ={})
    text = f"{caught.value} {caught.value!r} {caught.value.errors!r}"
    for literal in LITERALS:
        assert literal not in text


def test_a_duplicated_password_key_is_reported_without_its_value(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_text(
        "upstreams:\n"
        "  sendgrid:\n"
        "    password: env:SENDGRID_API_KEY\n"
        "    password: Hunter2-Dupl1cate\n"
    )
    proc = relay("check", "-c", ".", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == "relay.yaml:4: duplicate key 'password' (first at line 3)\n"
    assert "Hunter2-Dupl1cate" not in proc.stdout + proc.stderr


def _policies(case: Path) -> str:
    return "".join(p.read_text() for p in sorted((case / "policies").glob("*.yaml")))
