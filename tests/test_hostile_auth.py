"""AUTH guessing across connections (issue 7): the penalty box alone with a fake clock, then
end to end through `relay serve` with a STARTTLS listener and a users file."""

from __future__ import annotations

import base64
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from relay.smtp.penalty import PenaltyBox
from relay.smtp.users import hash_password
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream, send
from tests.sinks import ThreadedSink

PASSWORD = "correct horse battery staple"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the penalty box -----------------------------------------------------------------------


def test_failures_within_the_window_block_then_the_block_expires() -> None:
    clock = Clock()
    box = PenaltyBox(max_failures=3, window=60, cooloff=10, max_cooloff=40, clock=clock)
    assert box.failure("192.0.2.1") == 0.0
    assert box.failure("192.0.2.1") == 0.0
    assert box.blocked_for("192.0.2.1") == 0.0
    assert box.failure("192.0.2.1") == 10.0  # the third failure starts a block
    assert box.blocked_for("192.0.2.1") == 10.0
    assert box.blocked_for("192.0.2.2") == 0.0  # per address
    clock.now += 9.9
    assert box.blocked_for("192.0.2.1") == pytest.approx(0.1)
    clock.now += 0.1
    assert box.blocked_for("192.0.2.1") == 0.0


def test_each_new_block_doubles_up_to_the_cap() -> None:
    clock = Clock()
    box = PenaltyBox(max_failures=2, window=60, cooloff=10, max_cooloff=25, clock=clock)
    blocks = []
    for _ in range(4):
        box.failure("198.51.100.7")
        blocks.append(box.failure("198.51.100.7"))
        clock.now += blocks[-1]
    assert blocks == [10.0, 20.0, 25.0, 25.0]


def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = Clock()
    box = PenaltyBox(max_failures=3, window=60, cooloff=10, clock=clock)
    for _ in range(5):
        box.failure("192.0.2.9")
        box.failure("192.0.2.9")
        clock.now += 61
    assert box.blocked_for("192.0.2.9") == 0.0


def test_success_clears_the_failure_count_but_not_the_escalation() -> None:
    clock = Clock()
    box = PenaltyBox(max_failures=2, window=60, cooloff=10, max_cooloff=100, clock=clock)
    box.failure("a")
    box.success("a")
    assert box.failure("a") == 0.0  # the earlier failure was forgiven
    assert box.failure("a") == 10.0
    clock.now += 10
    box.success("a")
    box.failure("a")
    assert box.failure("a") == 20.0  # still the second block


def test_memory_is_bounded_under_a_distributed_guesser() -> None:
    clock = Clock()
    box = PenaltyBox(max_failures=2, window=60, cooloff=10, max_entries=100, clock=clock)
    for i in range(5000):
        box.failure(f"10.0.{i // 256}.{i % 256}")
    assert len(box) <= 100


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        PenaltyBox(max_failures=0)
    with pytest.raises(ValueError):
        PenaltyBox(cooloff=10, max_cooloff=5)


# ---- end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(relay_ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    relay_ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def tls_relay(tmp_path: Path, relay_ca: trustme.CA) -> Iterator[tuple[RelayProcess, ThreadedSink]]:
    cert = relay_ca.issue_cert("relay.test", "127.0.0.1")
    cdir = tmp_path / "relay"
    cdir.mkdir()
    cert.cert_chain_pems[0].write_to_path(str(cdir / "cert.pem"))
    cert.private_key_pem.write_to_path(str(cdir / "key.pem"))
    (cdir / "users").write_text(f"app:{hash_password(PASSWORD, n=2**10)}\n")
    with ThreadedSink() as sink:
        cfg = RelayConfig(
            cdir,
            upstreams={
                "plain": plain_upstream(sink.port)
            },
            default_upstream="plain",
            listeners=[
                {
                    "name": "smtp",
                    "address": "127.0.0.1",
                    "port": 0,
                    "tls": "starttls",
                    "cert_file": "cert.pem",
                    "key_file": "key.pem",
                }
            ],
            clients={"networks": ["127.0.0.1/32"], "users_file": "users"},
        ).write()
        with RelayProcess(cfg) as relay:
            yield relay, sink


def _session(port: int, source: str, tls: ssl.SSLContext) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10)
    s.ehlo("guesser.test")
    s.starttls(context=tls)
    s.ehlo("guesser.test")
    return s


def _auth(s: smtplib.SMTP, user: str, password: str) -> tuple[int, str]:
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    code, text = s.docmd("AUTH", f"PLAIN {blob}")
    return code, text.decode()


def test_guessing_across_connections_is_cut_off_per_address(
    tls_relay: tuple[RelayProcess, ThreadedSink], client_tls: ssl.SSLContext
) -> None:
    relay, sink = tls_relay
    guesser = "127.0.0.66"  # not an allowlisted network: it needs AUTH to relay
    # Connection 1: the per-connection limit (3 failures, then 421) still applies.
    s = _session(relay.port, guesser, client_tls)
    assert [_auth(s, "app", f"guess{i}")[0] for i in range(3)] == [535, 535, 535]
    code, raw = s.noop()  # the goodbye that followed the third 535
    assert (code, raw[:5]) == (421, b"4.7.0")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()
    # Connection 2: failures 4 and 5 from this address start the cool-off; the next AUTH
    # is refused with 421 4.7.0 before any password is checked — even the right one.
    s = _session(relay.port, guesser, client_tls)
    assert [_auth(s, "app", f"guess{i}")[0] for i in range(3, 5)] == [535, 535]
    code, text = _auth(s, "app", PASSWORD)
    assert (code, text[:5]) == (421, "4.7.0"), text
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()
    # Connection 3: refused at the greeting for the cool-off.
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", relay.port, source_address=(guesser, 0), timeout=10)
    error: bytes | str = refused.value.smtp_error
    assert refused.value.smtp_code == 421 and error[:5] in (b"4.7.0", "4.7.0")
    # Another address with the right password is unaffected and can relay.
    s = _session(relay.port, "127.0.0.67", client_tls)
    assert _auth(s, "app", PASSWORD)[0] == 235
    s.sendmail("app@x.test", ["legit@y.test"], b"Subject: ok\r\n\r\nhi\r\n")
    s.quit()
    # The allowlisted application network is never locked out by the guesser.
    send(relay.port, "app@x.test", ["allowlisted@y.test"])
    sink.wait_for(2, 15)
    rejected = relay.wait_events("rejected", 6)
    reasons = [(e["client"], e["reason"]) for e in rejected]
    assert reasons.count((guesser, "auth")) == 5
    assert (guesser, "auth_blocked") in reasons
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == [
        "allowlisted@y.test",
        "legit@y.test",
    ]
    assert (
        PASSWORD not in relay.output()
        and PASSWORD not in (relay.config_dir / "mail.log").read_text()
    )


def test_auth_is_never_offered_or_accepted_in_plaintext(
    tls_relay: tuple[RelayProcess, ThreadedSink], client_tls: ssl.SSLContext
) -> None:
    relay, sink = tls_relay
    with smtplib.SMTP("127.0.0.1", relay.port, source_address=("127.0.0.66", 0), timeout=10) as s:
        s.ehlo("client.test")
        assert not s.has_extn("auth") and s.has_extn("starttls")
        code, text = _auth(s, "app", PASSWORD)
        assert (code, text[:6]) == (538, "5.7.11")  # RFC 4954 § 6: encryption required
        # A plaintext session from an unlisted network cannot relay at all.
        code, _ = s.mail("app@x.test")
        assert code == 554
    # After STARTTLS the same password works (so the refusal above was about plaintext).
    s = _session(relay.port, "127.0.0.66", client_tls)
    assert s.has_extn("auth")
    assert _auth(s, "app", PASSWORD)[0] == 235
    s.quit()
    assert sink.messages == []
