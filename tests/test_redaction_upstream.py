"""Issue 12, finding 3: an upstream that quotes our password back (as is, or as the AUTH
PLAIN/LOGIN base64 we sent) must not put it anywhere: not in the mail log, the relay's log,
the spool, a DSN, an admin API answer or `relay test-upstream` output. A real `relay serve`
between a misbehaving server (535 quoting the credentials), an aiosmtpd sink (a 550 quoting
the password, hence a DSN) and the admin API."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from tests.adminapi import ENV, admin_url, http, relay_with_admin
from tests.badserver import BadServer
from tests.relayproc import RelayProcess, plain_upstream, send
from tests.sinks import Script, ThreadedSink

USER = "relayuser"
SECRET = "S3cr3t-Upstr34m-Pw"
PLAIN = base64.b64encode(f"\0{USER}\0{SECRET}".encode()).decode()
LOGIN = base64.b64encode(SECRET.encode()).decode()
FORMS = (SECRET, PLAIN, LOGIN)


def assert_clean(where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for form in FORMS:
        assert form.encode() not in data, f"{form!r} in {where}"


def test_secrets_echoed_by_an_upstream_are_redacted_everywhere(tmp_path: Path) -> None:
    echo = f"535 5.7.8 bad credentials: {USER} {SECRET} plain={PLAIN}, login {LOGIN}\r\n"
    script = Script(rcpt={"gone@example.org": f"550 5.7.1 {USER}/{SECRET} may not send there"})
    with BadServer(auth=True, reply={"auth": echo.encode()}) as bad, ThreadedSink(
        auth={USER: SECRET}, auth_require_tls=False, script=script
    ) as sink:
        directory = tmp_path / "relay"
        creds = {"username": USER, "password": "file:upstream-password"}
        cfg = relay_with_admin(
            directory,
            upstreams={"bad": plain_upstream(bad.port, **creds),
                       "good": plain_upstream(sink.port, **creds)},
            default_upstream="good",
            orgs=[{"org": "evil", "domains": ["bad.test"], "upstream": "bad"}],
            retry={"schedule": ["1h"], "jitter": 0, "max_age": "1d"},
        )
        cfg.write()
        (directory / "upstream-password").write_text(SECRET + "\n")
        with RelayProcess(directory, env=ENV) as relay:
            url = admin_url(relay)
            deferred_id = send(relay.port, "a@bad.test", ["r@example.org"]).split()[-1]
            send(relay.port, "a@good.test", ["gone@example.org"])
            [d] = relay.wait_events("deferred", 1)
            assert d["reply"].startswith("535 5.7.8 bad credentials") and "[redacted]" in d["reply"]
            [b] = relay.wait_events("bounced", 1)
            assert "[redacted]" in b["reply"]
            sink.wait_for(1)  # the DSN for gone@, back to a@good.test
            [dsn] = sink.messages
            assert dsn.mail_from == "" and b"[redacted]" in dsn.data
            assert_clean("the DSN", dsn.data)
            status, shown, _ = http("GET", f"{url}/queue/messages/{deferred_id}")
            assert status == 200 and "[redacted]" in json.dumps(shown)
            assert_clean("queue show", json.dumps(shown))
            status, tested, _ = http("POST", f"{url}/test-upstream", {"upstream": "bad"})
            assert status == 200 and "[redacted]" in json.dumps(tested)
            assert_clean("the API's test-upstream", json.dumps(tested))
            cli = subprocess.run(
                [sys.executable, "-m", "relay.cli", "test-upstream", "bad", "-c", str(directory)],
                capture_output=True, text=True, timeout=60,
            )
            assert cli.returncode == 1 and "AUTH PLAIN" in cli.stdout, cli.stdout + cli.stderr
            assert "[redacted]" in cli.stdout
            assert_clean("relay test-upstream", cli.stdout + cli.stderr)
        assert_clean("the relay's log", relay.output())
        assert_clean("the mail log", (directory / "mail.log").read_text())
        spool = b"".join(p.read_bytes() for p in (directory / "spool").iterdir() if p.is_file())
        assert_clean("the spool", spool)
