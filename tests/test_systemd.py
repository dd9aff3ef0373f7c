"""systemd integration: the unit passes `systemd-analyze verify`, the sysusers file creates
the user, the example /etc config validates with the unit's credentials, and readiness
(READY=1) arrives on a real notify socket only once the listener accepts connections."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.relayproc import RelayConfig, RelayProcess, plain_upstream, send
from tests.sinks import ThreadedSink

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "egress-relay.service"
SYSUSERS = ROOT / "systemd" / "egress-relay.sysusers"
EXAMPLE = ROOT / "systemd" / "relay.yaml"
INSTALLED_RELAY = "/opt/egress-relay/bin/relay"


def tool(name: str) -> str:
    path = shutil.which(name)
    # CI installs systemd (.ci/run); a missing tool must fail, never skip.
    assert path, f"{name} is not installed (apt-get install systemd)"
    return path


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify needs the ExecStart binaries to exist: point them at this checkout's relay.
    relay_bin = Path(sys.executable).parent / "relay"
    assert relay_bin.exists()
    unit = tmp_path / "egress-relay.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_RELAY, str(relay_bin)))
    done = subprocess.run([tool("systemd-analyze"), "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): any output about our unit fails.
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "egress-relay" in line]
    assert done.returncode == 0 and ours == [], done.stdout + done.stderr
    # The same check does catch a mistake (so the test can fail).
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSistem=strict"))
    done = subprocess.run([tool("systemd-analyze"), "verify", "--man=no", str(broken)],
                          capture_output=True, text=True, timeout=60)
    assert "Unknown key 'ProtectSistem'" in done.stdout + done.stderr


def test_unit_has_the_operating_contract() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["ExecStartPre"] == [f"{INSTALLED_RELAY} check -c /etc/egress-relay"]
    assert d["ExecStart"] == [f"{INSTALLED_RELAY} serve -c /etc/egress-relay"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["User"] == ["egress-relay"] and d["StateDirectory"] == ["egress-relay"]
    for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                       ("PrivateTmp", "yes"), ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
                       ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX")):
        assert d[key] == [value], key
    assert "@system-service" in d["SystemCallFilter"]
    # Every credential the example config names is loaded by the unit, and vice versa.
    loaded = {c.split(":", 1)[0] for c in d["LoadCredential"]}
    named = set(re.findall(r"credential:([A-Za-z0-9_.-]+)", EXAMPLE.read_text()))
    assert loaded == named


def _syscall_set(group: str) -> set[str]:
    """The system calls of a systemd filter group, as this machine's systemd defines it."""
    done = subprocess.run([tool("systemd-analyze"), "syscall-filter", group],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    names: set[str] = set()
    for line in done.stdout.splitlines()[1:]:  # the first line is the group's own name
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        names |= _syscall_set(entry) if entry.startswith("@") else {entry}
    return names


def _allowed_syscalls(lines: list[str]) -> set[str]:
    """systemd.exec(5): the first SystemCallFilter= (here an allow list) sets the default;
    each later one adds its calls to the set, or removes them when it starts with ~."""
    allowed: set[str] = set()
    for i, line in enumerate(lines):
        deny = line.startswith("~")
        assert i > 0 or not deny, "the unit's first SystemCallFilter= is an allow list"
        calls: set[str] = set()
        for item in line.lstrip("~").split():
            calls |= _syscall_set(item) if item.startswith("@") else {item}
        allowed = allowed - calls if deny else allowed | calls
    return allowed


def test_unit_lets_the_spool_writer_take_sched_batch_and_nothing_else_of_resources() -> None:
    # relay/spool/writer.py calls sched_setscheduler(SCHED_BATCH) on its thread; @resources
    # is denied as a whole, so the unit must allow that one call back (EPERM otherwise:
    # the relay runs, at ~15% more CPU per message).
    allowed = _allowed_syscalls(directives(UNIT.read_text())["SystemCallFilter"])
    assert "sched_setscheduler" in allowed
    assert "read" in allowed and "sendmsg" in allowed  # @system-service is the base
    denied = (_syscall_set("@resources") | _syscall_set("@privileged")) - {"sched_setscheduler"}
    assert {"setpriority", "sched_setaffinity", "sched_setattr", "setrlimit"} <= denied
    assert not allowed & denied


def test_sysusers_creates_the_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    done = subprocess.run([tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [entry] = [line for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
               if line.startswith("egress-relay:")]
    assert entry.endswith(":/var/lib/egress-relay:/usr/sbin/nologin")


def test_example_etc_config_validates_with_the_units_credentials(tmp_path: Path) -> None:
    etc = tmp_path / "etc-egress-relay"
    shutil.copytree(ROOT / "policies", etc / "policies")
    shutil.copy(EXAMPLE, etc / "relay.yaml")
    creds = tmp_path / "credentials"
    creds.mkdir()
    for line in directives(UNIT.read_text())["LoadCredential"]:
        (creds / line.split(":", 1)[0]).write_text("value-" + line.split(":", 1)[0])
    # The example policies reference their own customer secrets: give them too.
    env = {"PATH": os.environ["PATH"], "CREDENTIALS_DIRECTORY": str(creds),
           "EUROSTUDY_SMTP_PASSWORD": "x", "GLOBEX_RAJ_SMTP_PASSWORD": "y",
           "FABRIKAM_ENTRA_SECRET": "z", "FABRIKAM_SMTP_PASSWORD": "w",
           "FABRIKAM_GOOGLE_SA_KEY": "{}"}
    (etc / "policies" / "contoso.yaml").write_text(
        (etc / "policies" / "contoso.yaml").read_text().replace(
            "file:/etc/egress-relay/secrets/contoso-smtp", "credential:admin-token"))
    done = subprocess.run([sys.executable, "-m", "relay.cli", "check", "--strict", "-c", str(etc)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK (5 organisations" in done.stdout


@pytest.fixture
def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(20)
    return sock


@pytest.mark.parametrize("workers", [1, 2])
def test_readiness_on_a_real_notify_socket(
    tmp_path: Path, notify_socket: socket.socket, workers: int
) -> None:
    """With workers, only the supervisor notifies: once, after every worker is ready."""
    with ThreadedSink() as sink:
        cfg = RelayConfig(tmp_path / "relay",
                          upstreams={"s": plain_upstream(sink.port)},
                          default_upstream="s", workers=workers).write()
        relay = RelayProcess(cfg, env={"NOTIFY_SOCKET": notify_socket.getsockname()})
        try:
            relay.start()
            message = notify_socket.recv(4096).decode()
            assert message.splitlines()[0] == "READY=1"
            # Ready means accepting: the listener answers now.
            send(relay.port, "a@x.test", ["b@y.test"])
            sink.wait_for(1, 15)
            relay.stop()
            assert notify_socket.recv(4096).decode().startswith("STOPPING=1")
            notify_socket.settimeout(0.5)  # nothing else: no READY or STOPPING from a worker
            with pytest.raises(TimeoutError):
                notify_socket.recv(4096)
        finally:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.proc.kill()
        notify_socket.close()


def test_readiness_is_not_sent_before_the_listeners(tmp_path: Path, notify_socket: socket.socket) -> None:
    """A relay that cannot bind its listener never says READY (systemd then fails the start)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = RelayConfig(tmp_path / "relay",
                          listeners=[{"name": "smtp", "address": "127.0.0.1", "port": port}]).write()
        env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
        done = subprocess.run([sys.executable, "-m", "relay.cli", "serve", "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(4096)
