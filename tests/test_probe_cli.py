"""`relay test-upstream` as a command: a configured upstream and an ad-hoc server (password
only as a reference), text and JSON output, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.certs import CertAuthority
from tests.relayproc import RelayConfig
from tests.sinks import ThreadedSink


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", "test-upstream", *args],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], **(env or {})})


def test_configured_and_adhoc(tmp_path: Path, ca: CertAuthority) -> None:
    with ThreadedSink(tls="implicit", tls_context=ca.server_context("mx.test"),
                      auth={"u@cust.test": "pw-right-1"}) as sink:
        cfg = RelayConfig(tmp_path / "relay", orgs=[{
            "org": "cust", "domains": ["cust.test"], "upstream": "own", "pool": "b",
            "upstreams": {"own": {"host": "mx.test", "port": sink.port, "tls": "implicit",
                                  "username": "u@cust.test", "password": "env:CUST_PW",
                                  "ca_file": ca.ca_file, "allow_tls_port_mismatch": True}}}]).write()
        ok = run("cust/own", "-c", str(cfg), "--json", env={"CUST_PW": "pw-right-1"})
        assert ok.returncode == 0, ok.stdout + ok.stderr
        [rep] = json.loads(ok.stdout)["reports"]
        assert rep["source_address"] == "127.0.0.3"  # the organisation's pool, not the upstream's
        assert [s["name"] for s in rep["steps"]][2:] == [
            "TLS", "greeting", "EHLO b.relay.test", "AUTH PLAIN", "QUIT"]
        # Ad hoc: the same server with a wrong password, from a chosen source.
        bad = run("-c", str(cfg), "--host", "mx.test", "--port", str(sink.port), "--tls", "implicit",
                  "--username", "u@cust.test", "--password-ref", "env:TRY_PW", "--ca-file", ca.ca_file,
                  "--source", "a", "--allow-tls-port-mismatch", env={"TRY_PW": "pw-wrong-2"})
        assert bad.returncode == 1
        assert "AUTH PLAIN: 535 5.7.8 Authentication credentials invalid ... FAILED" in bad.stdout
        assert "hint: the server refused the username/password" in bad.stdout
        assert "from egress source a (127.0.0.2)" in bad.stdout
        assert "pw-wrong-2" not in bad.stdout + bad.stderr
        assert [s.peer_ip for s in sink.sessions] == ["127.0.0.3", "127.0.0.2"]
    # A literal password is not an option; a name and a description together are refused.
    lit = run("-c", str(cfg), "--host", "mx.test", "--port", "465", "--tls", "implicit",
              "--password-ref", "hunter2")
    assert lit.returncode == 2 and "reference" in lit.stderr and "hunter2" not in lit.stderr
    assert run("cust/own", "--host", "x", "-c", str(cfg)).returncode == 2
    assert "unknown upstream 'nope'" in run("nope", "-c", str(cfg)).stderr
