"""Upstream throttles end to end: real `relay serve` subprocesses, real sinks, real Redis.

Each test runs with the memory backend and with Redis unless it is about sharing between
nodes or losing Redis. The sink records when each message arrived and how many sessions
were open at once; the mail log says what the relay did.
"""

from __future__ import annotations

import contextlib
import itertools
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.scheduler import Entry, UpstreamQueue
from tests.redisproc import RedisServer
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream, send
from tests.sinks import Script, ThreadedSink

Limits = dict[str, Any]


@dataclass
class Bench:
    """One relay per backend with an upstream (and sink) per throttle under test."""

    relay: RelayProcess
    sinks: dict[str, ThreadedSink]
    throttled_at: list[float] = field(default_factory=list)


def plain(sink: ThreadedSink, **throttle: Any) -> dict[str, Any]:
    return plain_upstream(sink.port, throttle=throttle)


def config(directory: Path, sink: ThreadedSink, limits: Limits, **throttle: Any) -> Path:
    return RelayConfig(
        directory,
        upstreams={"plain": plain(sink, **throttle)},
        default_upstream="plain",
        limits=limits,
    ).write()


@pytest.fixture(scope="module", params=["memory", "redis"])
def bench(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bench]:
    throttled_at: list[float] = []

    def slow_down_once(envelope: Any) -> str | None:
        if not throttled_at:
            throttled_at.append(time.time())
            return "451 4.7.1 Too many messages, slow down"
        return None

    with contextlib.ExitStack() as stack:
        limits: Limits = {"backend": "memory"}
        if request.param == "redis":
            server = stack.enter_context(RedisServer())
            limits = {"backend": "redis", "redis_url": server.url}
        sinks = {
            "interval": stack.enter_context(ThreadedSink()),
            "conns": stack.enter_context(ThreadedSink(script=Script(data_delay=0.15))),
            "fair": stack.enter_context(ThreadedSink()),
            "slow": stack.enter_context(ThreadedSink(script=Script(data_fn=slow_down_once))),
            "capped": stack.enter_context(ThreadedSink()),
        }
        upstreams = {
            "interval": plain(sinks["interval"], min_interval="250ms"),
            "conns": plain(sinks["conns"], max_connections=2),
            "fair": plain(sinks["fair"], max_connections=1, min_interval="150ms"),
            "slow": plain(sinks["slow"], max_connections=1),
            "capped": plain(sinks["capped"]),
        }
        orgs = [
            {"org": name, "domains": [f"{name}.test"], "upstream": name}
            for name in ("interval", "conns", "slow")
        ]
        orgs += [
            {"org": "bulk", "domains": ["bulk.test"], "upstream": "fair"},
            {"org": "small", "domains": ["small.test"], "upstream": "fair"},
            {
                "org": "capped",
                "domains": ["capped.test"],
                "upstream": "capped",
                "limits": {"per_minute": 2},
            },
        ]
        cfg = RelayConfig(
            tmp_path_factory.mktemp(request.param),
            upstreams=upstreams,
            default_upstream="capped",
            orgs=orgs,
            limits={**limits, "slow_down_initial": "1500ms", "client": {"max_connections": 3}},
        ).write()
        relay = stack.enter_context(RelayProcess(cfg))
        yield Bench(relay, sinks, throttled_at)


def send_many(port: int, messages: list[tuple[str, str]]) -> None:
    """Several messages over one SMTP connection (fast, like a platform's pooled client)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        for sender, rcpt in messages:
            s.sendmail(sender, [rcpt], f"From: {sender}\r\nTo: {rcpt}\r\nSubject: t\r\n\r\nHi.\r\n")


def test_minimum_interval_is_honoured_at_the_sink(bench: Bench) -> None:
    sink = bench.sinks["interval"]
    send_many(bench.relay.port, [(f"a{i}@interval.test", f"r{i}@y.test") for i in range(6)])
    sink.wait_for(6, 20)
    times = sorted(m.timestamp for m in sink.messages)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Starts are >= 250 ms apart; arrival times add a few ms of jitter either way.
    assert min(gaps) >= 0.2, gaps


def test_max_connections_is_never_exceeded(bench: Bench) -> None:
    sink = bench.sinks["conns"]
    send_many(bench.relay.port, [(f"a{i}@conns.test", f"r{i}@y.test") for i in range(10)])
    sink.wait_for(10, 20)
    assert sink.max_concurrent == 2  # used, and never more


def test_one_organisations_backlog_does_not_starve_another(bench: Bench) -> None:
    sink = bench.sinks["fair"]
    send_many(bench.relay.port, [("news@bulk.test", f"b{i}@y.test") for i in range(40)])
    send_many(bench.relay.port, [("receipts@small.test", f"s{i}@y.test") for i in range(3)])
    deadline = time.monotonic() + 20
    while not all(f"s{i}@y.test" in sink.recipients for i in range(3)):
        assert time.monotonic() < deadline, sink.recipients
        time.sleep(0.02)
    delivered = sink.recipients
    first_small = min(delivered.index(f"s{i}@y.test") for i in range(3))
    # Round robin: the three receipts go within the next few slots, not after 40 newsletters.
    assert delivered.index("s2@y.test") - first_small <= 6, " ".join(delivered)
    assert sum(r.startswith("b") for r in delivered) < 30, " ".join(delivered)


def test_a_throttling_reply_slows_the_whole_upstream(bench: Bench) -> None:
    sink = bench.sinks["slow"]
    send_many(bench.relay.port, [(f"a{i}@slow.test", f"r{i}@y.test") for i in range(4)])
    sink.wait_for(4, 20)
    assert "upstream slow asked to slow down; pausing its queue" in bench.relay.output()
    # Not just the refused message: nothing at all went to that upstream during the pause.
    assert min(m.timestamp for m in sink.messages) >= bench.throttled_at[0] + 1.4


def test_intake_limit_answers_451_and_logs_the_hit(bench: Bench) -> None:
    relay = bench.relay
    send(relay.port, "a@capped.test", ["r0@y.test"])
    send(relay.port, "b@capped.test", ["r1@y.test"])
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(relay.port, "c@capped.test", ["r2@y.test"])
    send(relay.port, "a@elsewhere.test", ["r3@y.test"])  # another organisation is not limited
    bench.sinks["capped"].wait_for(3, 20)
    assert info.value.smtp_code == 451
    text = info.value.smtp_error.decode()
    assert text.startswith(
        "4.7.1 organisation capped: 2 messages per minute exceeded, try again in "
    )
    [rejected] = [e for e in relay.events("rejected") if e.get("reason") == "RateLimited"]
    assert rejected["detail"].startswith("limit organisation capped")
    assert sorted(bench.sinks["capped"].recipients) == ["r0@y.test", "r1@y.test", "r3@y.test"]


def test_concurrent_connections_per_client_are_capped(bench: Bench) -> None:
    port = bench.relay.port
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(smtplib.SMTP("127.0.0.1", port, timeout=10)) for _ in range(3)]
        with pytest.raises(smtplib.SMTPConnectError) as info:
            smtplib.SMTP("127.0.0.1", port, timeout=10)
        assert info.value.smtp_code == 421
        assert b"4.7.1 client 127.0.0.1: 3 concurrent connections exceeded" in info.value.smtp_error
        held.pop().quit()
        deadline = time.monotonic() + 10
        while True:  # the relay counts the closed connection as soon as it sees it go
            try:
                stack.enter_context(smtplib.SMTP("127.0.0.1", port, timeout=10))
                break
            except smtplib.SMTPConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    rejected = [
        e for e in bench.relay.events("rejected") if "max_connections" in e.get("detail", "")
    ]
    assert rejected and rejected[0]["client"] == "127.0.0.1"


def test_a_throttle_that_refuses_every_other_try_still_serves_both_organisations() -> None:
    q = UpstreamQueue("u")
    for i in range(5):
        q.push(Entry(queue_id=f"b{i}", sender="", org="bulk", account="", received_at=0.0, pending={}))
    for i in range(2):
        q.push(Entry(queue_id=f"s{i}", sender="", org="small", account="", received_at=0.0, pending={}))
    order = []
    for _ in range(7):
        refused = q.pop()
        assert refused is not None
        q.unpop(refused)  # "not yet": its organisation keeps its turn
        e = q.pop()
        assert e is not None and e.queue_id == refused.queue_id
        order.append(e.queue_id)
    assert order == ["b0", "s0", "b1", "s1", "b2", "b3", "b4"]


def test_two_nodes_share_a_quota_exactly(tmp_path: Path, redis_server: RedisServer) -> None:
    """The hourly quota's mechanism over a 2 s window (`quotas: ["5 per 2s"]` is the same
    fixed-window counter as `hourly: 5`), so "the rest after it" takes seconds, not hours."""
    window, quota, total = 2, 5, 15
    limits = {"backend": "redis", "redis_url": redis_server.url}
    with ThreadedSink() as sink:
        nodes = [
            RelayProcess(
                config(
                    tmp_path / f"node{n}",
                    sink,
                    {**limits, "node_id": f"n{n}"},
                    quotas=[f"{quota} per {window}s"],
                )
            )
            for n in (1, 2)
        ]
        with contextlib.ExitStack() as stack:
            for node in nodes:
                stack.enter_context(node)
            for i in range(total):
                send(nodes[i % 2].port, "a@x.test", [f"r{i}@y.test"])
            sink.wait_for(total, 30)
    times = sorted(m.timestamp for m in sink.messages)
    # Exactly the quota per window: 5 at once, the next 5 only once the window has passed.
    assert times[quota - 1] - times[0] < window - 0.5, times
    assert times[quota] - times[0] >= window - 0.3, times
    assert times[2 * quota] - times[quota] >= window - 0.3, times
    assert all(node.events("delivered") for node in nodes)  # both nodes sent their share


def test_two_nodes_share_max_connections(tmp_path: Path, redis_server: RedisServer) -> None:
    limits = {"backend": "redis", "redis_url": redis_server.url}
    with ThreadedSink(script=Script(data_delay=0.15)) as sink:
        nodes = [
            RelayProcess(
                config(
                    tmp_path / f"node{n}", sink, {**limits, "node_id": f"n{n}"}, max_connections=2
                )
            )
            for n in (1, 2)
        ]
        with contextlib.ExitStack() as stack:
            for node in nodes:
                stack.enter_context(node)
            for i in range(8):
                send_many(nodes[i % 2].port, [(f"a{i}@x.test", f"r{i}@y.test")])
            sink.wait_for(8, 30)
    assert sink.max_concurrent == 2


def test_redis_stopped_mid_run_loses_nothing(tmp_path: Path, redis_server: RedisServer) -> None:
    limits = {
        "backend": "redis",
        "redis_url": redis_server.url,
        "redis_retry": "500ms",
        "organisation": {"per_minute": 100},
    }
    with ThreadedSink() as sink:
        with RelayProcess(
            config(tmp_path / "r", sink, limits, max_connections=2, hourly=1000)
        ) as relay:
            for i in range(5):
                send(relay.port, "a@x.test", [f"r{i}@y.test"])
            sink.wait_for(5, 20)
            redis_server.stop()
            for i in range(5, 10):
                send(relay.port, "a@x.test", [f"r{i}@y.test"])  # accepted on local limits
            sink.wait_for(10, 20)
            redis_server.start()
            for i in range(10, 12):
                send(relay.port, "a@x.test", [f"r{i}@y.test"])
            sink.wait_for(12, 20)
            out = relay.output()
    assert sorted(sink.recipients) == sorted(f"r{i}@y.test" for i in range(12))
    assert out.count("limits backend unreachable") == 1, out
    assert "enforcing local limits" in out


def test_redis_down_with_tempfail_refuses_then_delivers_everything(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    limits = {
        "backend": "redis",
        "redis_url": redis_server.url,
        "redis_retry": "300ms",
        "on_backend_failure": "tempfail",
        "organisation": {"per_minute": 100},
    }
    with ThreadedSink() as sink:
        with RelayProcess(config(tmp_path / "r", sink, limits)) as relay:
            send(relay.port, "a@x.test", ["r0@y.test"])
            sink.wait_for(1, 20)
            redis_server.stop()
            with pytest.raises(smtplib.SMTPDataError) as info:
                send(relay.port, "a@x.test", ["r1@y.test"])
            assert info.value.smtp_code == 451
            assert b"4.7.1 rate limits temporarily unavailable" in info.value.smtp_error
            redis_server.start()
            deadline = time.monotonic() + 15
            while True:  # the platform retries, as it would after any 451
                try:
                    send(relay.port, "a@x.test", ["r1@y.test"])
                    break
                except smtplib.SMTPDataError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            sink.wait_for(2, 20)
            rejected = relay.events("rejected")
    assert sorted(sink.recipients) == ["r0@y.test", "r1@y.test"]
    assert rejected and rejected[0]["detail"] == "limits backend unavailable"
