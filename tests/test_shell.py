"""Shell completion (real bash and zsh) and the man page (rendered by groff), both generated
from the argument parser, so they list exactly the commands `relay` has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from relay.cli.main import build_parser

RELAY = [sys.executable, "-m", "relay.cli"]


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)  # type: ignore[arg-type]


def _script(tmp_path: Path, shell: str) -> Path:
    out = subprocess.run([*RELAY, "completion", shell], capture_output=True, text=True, check=True)
    path = tmp_path / ("relay.bash" if shell == "bash" else "_relay")
    path.write_text(out.stdout)
    return path


def _bash_complete(script: Path, words: list[str]) -> list[str]:
    """What bash offers for the last word of `words`, through the generated function."""
    line = " ".join(words)
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f"COMP_LINE={line!r}; COMP_POINT={len(line)}\n"
        "_shtab_relay relay\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return sorted(filter(None, out.stdout.split("\n")))


def test_bash_completes_subcommands_queue_actions_and_options(tmp_path: Path) -> None:
    script = _script(tmp_path, "bash")
    assert _bash_complete(script, ["relay", ""]) == _subcommands()
    assert _bash_complete(script, ["relay", "qu"]) == ["queue"]
    assert {"show", "summary"} <= set(_bash_complete(script, ["relay", "queue", "s"]))
    assert _bash_complete(script, ["relay", "check", "--st"]) == ["--strict"]


def test_zsh_loads_the_completion_and_registers_it(tmp_path: Path) -> None:
    script = _script(tmp_path, "zsh")
    program = (
        f"fpath=({tmp_path} $fpath); autoload -U compinit; compinit -u -D; "
        "print -r -- ${_comps[relay]}"
    )
    out = subprocess.run(
        ["zsh", "-f", "-c", program], capture_output=True, text=True, env={"HOME": str(tmp_path)}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "_relay"
    assert subprocess.run(["zsh", "-n", str(script)], capture_output=True).returncode == 0


def test_the_man_page_renders_and_names_every_subcommand() -> None:
    page = subprocess.run([*RELAY, "manpage"], capture_output=True, text=True, check=True).stdout
    assert page.startswith(".TH RELAY \"1\"")
    rendered = subprocess.run(
        ["groff", "-man", "-Tascii", "-P", "-cbou"], input=page, capture_output=True, text=True,
        check=True,
    ).stdout
    assert "relay - policy-routed SMTP relay" in rendered
    for name in _subcommands():
        assert f"relay {name}" in rendered, name
