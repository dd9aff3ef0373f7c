"""Issue 12, findings 4 and 5: every file the relay opens is checked when a configuration is
loaded (`relay check`, `relay serve`, reload), with `file:line`; a port in use ends the start
with one line; a reload that would use a missing or broken file keeps the old configuration.
Real `relay` subprocesses; certificates from trustme."""

from __future__ import annotations

import contextlib
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.smtp.users import hash_password
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream
from tests.sinks import ThreadedSink

PASSWORD = "correct horse battery staple"


def relay_cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Task exception" not in text, text


@pytest.fixture(scope="module")
def relay_ca() -> trustme.CA:
    return trustme.CA()


def tls_config(directory: Path, ca: trustme.CA, sink_port: int = 9, **extra: Any) -> RelayConfig:
    """A relay with a STARTTLS listener (cert.pem, key.pem) and a users file."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    (directory / "users").write_text(f"alice:{hash_password(PASSWORD, n=2**10)}\n")
    return RelayConfig(
        directory,
        upstreams={"plain": plain_upstream(sink_port)},
        default_upstream="plain",
        listeners=[
            {"name": "smtp", "address": "127.0.0.1", "port": 0, "tls": "starttls",
             "cert_file": "cert.pem", "key_file": "key.pem"}
        ],
        clients={"networks": ["10.255.255.0/24"], "users_file": "users"},
        **extra,
    )


def line_of(directory: Path, key: str) -> int:
    """The 1-based line of the first occurrence of `key:` in relay.yaml."""
    for number, text in enumerate((directory / "relay.yaml").read_text().splitlines(), 1):
        if text.strip().lstrip("- ").startswith(f"{key}:"):
            return number
    raise AssertionError(key)


# -- relay check / relay serve: missing and broken files ----------------------------------------


@pytest.mark.parametrize("missing", ["cert.pem", "key.pem", "users"])
def test_a_missing_file_fails_check_and_serve_with_its_line(
    tmp_path: Path, relay_ca: trustme.CA, missing: str
) -> None:
    directory = tls_config(tmp_path / "relay", relay_ca).write()
    (directory / missing).unlink()
    key = {"cert.pem": "cert_file", "key.pem": "key_file", "users": "users_file"}[missing]
    where = f"relay.yaml:{line_of(directory, key)}: "
    check = relay_cli("check", "--strict", "-c", ".", cwd=directory)
    assert check.returncode == 1, check.stdout + check.stderr
    assert where in check.stderr, check.stderr
    assert f"{missing}: No such file or directory" in check.stderr, check.stderr
    serve = relay_cli("serve", "-c", ".", cwd=directory)
    assert serve.returncode == 2
    assert where in serve.stderr, serve.stderr
    no_traceback(serve.stderr)


def test_a_certificate_with_another_key_fails_check(tmp_path: Path, relay_ca: trustme.CA) -> None:
    directory = tls_config(tmp_path / "relay", relay_ca).write()
    relay_ca.issue_cert("other.test").private_key_pem.write_to_path(str(directory / "key.pem"))
    check = relay_cli("check", "-c", ".", cwd=directory)
    assert check.returncode == 1
    assert f"relay.yaml:{line_of(directory, 'cert_file')}: listener 'smtp': cert_file and key_file" \
        in check.stderr, check.stderr
    (directory / "cert.pem").write_text("not a certificate\n")
    check = relay_cli("check", "-c", ".", cwd=directory)
    assert check.returncode == 1 and "do not load as a certificate" in check.stderr, check.stderr


def test_a_users_file_with_a_bad_line_fails_check_and_serve(
    tmp_path: Path, relay_ca: trustme.CA
) -> None:
    directory = tls_config(tmp_path / "relay", relay_ca).write()
    with (directory / "users").open("a") as f:
        f.write("bob:not-a-hash\n")
    check = relay_cli("check", "-c", ".", cwd=directory)
    assert check.returncode == 1
    assert "users:2: invalid hash for 'bob'" in check.stderr, check.stderr
    serve = relay_cli("serve", "-c", ".", cwd=directory)
    assert serve.returncode == 2 and "users:2: invalid hash" in serve.stderr, serve.stderr
    no_traceback(serve.stderr)


def test_a_mail_log_in_a_missing_directory_fails_check(tmp_path: Path) -> None:
    cfg = RelayConfig(tmp_path / "relay", log={"mail_log": "nowhere/mail.log"})
    directory = cfg.write()
    check = relay_cli("check", "-c", ".", cwd=directory)
    assert check.returncode == 1
    assert f"relay.yaml:{line_of(directory, 'mail_log')}: mail_log" in check.stderr, check.stderr


@contextlib.contextmanager
def occupied_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_a_port_in_use_ends_the_start_with_one_line(tmp_path: Path) -> None:
    with occupied_port() as port:
        cfg = RelayConfig(
            tmp_path / "relay",
            listeners=[{"name": "smtp", "address": "127.0.0.1", "port": port}],
            log={"mail_log": "mail.log", "format": "text"},
        )
        directory = cfg.write()
        serve = relay_cli("serve", "-c", ".", cwd=directory)
    assert serve.returncode == 1
    no_traceback(serve.stderr)
    [line] = [x for x in serve.stderr.splitlines() if "cannot start" in x]
    assert f"listener smtp cannot listen on 127.0.0.1:{port}: address already in use" in line
    # Nothing was left behind: once the port is free, the same configuration starts.
    with RelayProcess(directory) as relay:
        assert relay.port == port


# -- reload ---------------------------------------------------------------------------------------


def wait_for(relay: RelayProcess, text: str, within: float = 15.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in relay.stderr:
            if text in line:
                return line
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not logged:\n{relay.output()}")


def auth_and_send(port: int, ca: trustme.CA) -> str:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=ctx)
        s.login("alice", PASSWORD)
        refused = s.sendmail("app@example.com", ["r@example.org"], b"Subject: x\r\n\r\nhi\r\n")
    return "refused" if refused else "250"


@pytest.mark.parametrize("remove", ["users", "cert.pem"])
def test_a_reload_after_a_file_was_removed_keeps_the_old_configuration(
    tmp_path: Path, relay_ca: trustme.CA, remove: str
) -> None:
    with ThreadedSink() as sink:
        cfg = tls_config(tmp_path / "relay", relay_ca, sink.port,
                         log={"mail_log": "mail.log", "format": "text"})
        directory = cfg.write()
        with RelayProcess(directory) as relay:
            assert auth_and_send(relay.port, relay_ca) == "250"
            (directory / remove).unlink()
            relay.signal(signal.SIGHUP)
            line = wait_for(relay, "reload refused")
            key = "users_file" if remove == "users" else "cert_file"
            assert f"relay.yaml:{line_of(directory, key)}: " in line, line
            assert "configuration reloaded" not in relay.output()
            # The old configuration (its users, its certificate) still serves.
            assert auth_and_send(relay.port, relay_ca) == "250"
            sink.wait_for(2)
        no_traceback(relay.output())
