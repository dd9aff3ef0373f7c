"""`workers: N`: a supervisor, N worker processes on one listening socket, one spool shard
each (relay/runtime/supervisor.py, relay/spool/shards.py, relay/runtime/fanout.py, relay/limits/machine.py).

Shards are filled offline through the Spool API where a test needs mail in a *given*
worker's shard: which worker accepts a connection is the kernel's choice."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from relay.limits.partition import part
from relay.runtime.fanout import merge_metrics, merge_summaries
from relay.spool import Spool
from relay.spool.shards import merge_shard, shard_path, surplus_shards
from tests.adminapi import ENV, admin_url, http, relay_with_admin
from tests.redisproc import RedisServer
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream, send
from tests.sinks import Script, ThreadedSink

ORGS = [{"org": "acme", "domains": ["acme.test"]}, {"org": "globex", "domains": ["globex.test"]}]


def fill(spool_dir: Path, n: int, *, org: str = "acme", rcpt: str = "x@dest.test") -> list[str]:
    """Queue `n` messages in the spool at `spool_dir` (routed to upstream `plain`)."""

    async def go() -> list[str]:
        spool = await Spool.open(spool_dir)
        try:
            return [
                await spool.put(
                    sender=f"s{i}@{org}.test", recipients=[rcpt],
                    data=f"Subject: {i}\r\n\r\nbody {i}\r\n".encode(), client="127.0.0.1",
                    org=org, account=f"s{i}@{org}.test", upstream="plain",
                )
                for i in range(n)
            ]
        finally:
            await spool.close()

    return asyncio.run(go())


def worker_pids(relay: RelayProcess) -> list[int]:
    assert relay.proc is not None
    pid = relay.proc.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for(predicate: object, what: str, relay: RelayProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{relay.output()}")
        time.sleep(0.05)


def deliver_from_both_shards(cfg: Path, sink: ThreadedSink, n: int) -> None:
    """Queue `n` messages in each worker's shard (acme in 0, globex in 1), run the relay
    until the sink has all of them, from both organisations (so both workers delivered),
    and stop it."""
    root = cfg / "spool"
    fill(root, n)
    fill(shard_path(root, 1), n, org="globex")
    with RelayProcess(cfg) as relay:
        sink.wait_for(2 * n, 30)
        assert {m.mail_from.split("@")[1] for m in sink.messages} == {"acme.test", "globex.test"}
        assert relay.stop() == 0


# -- unit: the split, the merges --------------------------------------------------------------


@pytest.mark.parametrize("amount", [1, 2, 3, 7, 20, 101])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_parts_add_up_to_the_limit(amount: int, count: int) -> None:
    parts = [part(amount, i, count) for i in range(count)]
    assert all(p >= 1 for p in parts)
    # Exact when every worker can have one; else each still gets one (relay check warns).
    assert sum(parts) == (amount if amount >= count else count)
    assert max(parts) - min(parts) <= 1


def test_merged_metrics_sum_counters_and_take_the_oldest_age() -> None:
    a = ("# HELP relay_recipients_total x\n# TYPE relay_recipients_total counter\n"
         'relay_recipients_total{disposition="delivered"} 3.0\n'
         "# HELP relay_queue_oldest_age_seconds y\n# TYPE relay_queue_oldest_age_seconds gauge\n"
         'relay_queue_oldest_age_seconds{upstream="plain"} 10.0\n')
    b = a.replace(" 3.0", " 4.0").replace(" 10.0", " 7.5")
    merged = merge_metrics([a, b])
    assert 'relay_recipients_total{disposition="delivered"} 7\n' in merged
    assert 'relay_queue_oldest_age_seconds{upstream="plain"} 10\n' in merged
    assert merged.count("# TYPE relay_recipients_total counter") == 1


def test_merged_summaries_add_groups() -> None:
    one = {"messages": 2, "recipients_pending": 3, "held": 1, "oldest_received_at": 5.0,
           "oldest_age": 9.0, "by_upstream": {"plain": {"messages": 2, "recipients_pending": 3,
           "held": 1, "oldest_received_at": 5.0, "oldest_age": 9.0}}, "by_org": {}}
    two = {"messages": 1, "recipients_pending": 1, "held": 0, "oldest_received_at": 4.0,
           "oldest_age": 10.0, "by_upstream": {"plain": {"messages": 1, "recipients_pending": 1,
           "held": 0, "oldest_received_at": 4.0, "oldest_age": 10.0}}, "by_org": {}}
    m = merge_summaries([one, two])
    assert (m["messages"], m["recipients_pending"], m["held"]) == (3, 4, 1)
    assert m["oldest_received_at"] == 4.0 and m["oldest_age"] == 10.0
    assert m["by_upstream"]["plain"]["messages"] == 3


def test_merging_a_shard_twice_copies_nothing_twice(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    fill(root, 2)
    w3 = shard_path(root, 3)
    ids = fill(w3, 3, org="globex")
    copy = tmp_path / "copy"  # the shard as it was: as if a crash hit after the commit
    copy.mkdir()
    for f in w3.iterdir():
        if f.name.startswith("spool.db"):
            copy.joinpath(f.name).write_bytes(f.read_bytes())
    assert surplus_shards(root, 2) == [w3]
    assert merge_shard(w3, root) == 3 and not w3.exists()
    assert merge_shard(copy, root) == 0

    async def count() -> tuple[int, list[str]]:
        spool = await Spool.open(root)
        try:
            s = await spool.summary()
            return s["messages"], [m.queue_id for m in spool.iter_pending() if m.org == "globex"]
        finally:
            await spool.close()

    total, globex = asyncio.run(count())
    assert total == 5 and sorted(globex) == sorted(ids)


# -- the real thing -----------------------------------------------------------------------------


def test_two_workers_deliver_everything_sent_at_once(tmp_path: Path) -> None:
    with ThreadedSink() as sink:
        cfg = relay_with_admin(tmp_path / "relay", upstreams={"plain": plain_upstream(sink.port)},
                               default_upstream="plain", workers=2, orgs=ORGS).write()
        with RelayProcess(cfg, env=ENV) as relay:
            assert len(worker_pids(relay)) == 2
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(
                    lambda i: send(relay.port, f"s{i}@acme.test", [f"r{i}@dest.test"]), range(40)))
            assert len(set(replies)) == 40  # 40 distinct queue ids
            sink.wait_for(40)
            assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(
                f"r{i}@dest.test" for i in range(40))
            relay.wait_events("delivered", 40)
            status, text, _ = http("GET", admin_url(relay) + "/metrics", token=None)
            assert status == 200
            assert "relay_workers_up 2" in text
            received = [ln for ln in text.splitlines() if ln.startswith("relay_received_messages_total")]
            assert sum(float(ln.rsplit(" ", 1)[1]) for ln in received) == 40, received
            workers = worker_pids(relay)
            assert relay.stop() == 0
        assert not any(Path(f"/proc/{p}").exists() for p in workers)


def test_each_worker_serves_its_shard_and_the_api_sees_both(tmp_path: Path) -> None:
    defer = Script(rcpt_fn=lambda r: "451 4.3.0 busy")
    with ThreadedSink(script=defer) as sink:
        cfg = relay_with_admin(tmp_path / "relay", upstreams={"plain": plain_upstream(sink.port)},
                               default_upstream="plain", workers=2, orgs=ORGS,
                               retry={"schedule": ["1h"], "jitter": 0, "max_age": "1d"}).write()
        root = cfg / "spool"
        ids0 = fill(root, 2)
        ids1 = fill(shard_path(root, 1), 3, org="globex")
        with RelayProcess(cfg, env=ENV) as relay:
            relay.wait_events("deferred", 5)  # both workers recovered and tried their own
            url = admin_url(relay)
            status, summary, _ = http("GET", url + "/queue")
            assert status == 200, summary
            assert summary["messages"] == 5 and summary["by_org"]["globex"]["messages"] == 3
            assert summary["unavailable_workers"] == []
            status, listing, _ = http("GET", url + "/queue/messages?limit=4")
            assert listing["count"] == 4
            status, listing, _ = http("GET", url + "/queue/messages")
            assert sorted(m["queue_id"] for m in listing["messages"]) == sorted(ids0 + ids1)
            status, shown, _ = http("GET", url + f"/queue/messages/{ids1[0]}")
            assert status == 200 and shown["org"] == "globex"
            status, _, _ = http("GET", url + "/queue/messages/0000000000000000")
            assert status == 404
            status, res, _ = http("POST", url + f"/queue/messages/{ids1[1]}/hold")
            assert status == 200 and res["result"] == "ok"
            status, res, _ = http("POST", url + "/queue/actions",
                                  {"action": "hold", "ids": [ids0[0], ids1[2], "0000000000000000"]})
            assert status == 200 and res["counts"] == {"ok": 2, "not_found": 1}
            status, res, _ = http("POST", url + "/queue/actions", {"action": "delete", "org": "acme"})
            assert status == 200 and res["counts"] == {"ok": 2}
            status, summary, _ = http("GET", url + "/queue")
            assert summary["messages"] == 3 and summary["held"] == 2
            status, _, _ = http("GET", url + "/queue", token="wrong")
            assert status == 401


def test_a_killed_worker_is_restarted_and_delivers_its_shard(tmp_path: Path) -> None:
    with ThreadedSink() as sink:
        cfg = RelayConfig(tmp_path / "relay", upstreams={"plain": plain_upstream(sink.port)},
                          default_upstream="plain", workers=2, orgs=ORGS).write()
        with RelayProcess(cfg) as relay:
            before = worker_pids(relay)
            os.kill(before[1], signal.SIGKILL)
            wait_for(lambda: "exited with status -9" in relay.output(), "the restart notice", relay)
            wait_for(lambda: len(set(worker_pids(relay)) - set(before)) == 1, "a new worker", relay)
            wait_for(lambda: relay.output().count("recovered 0 unfinished") >= 3,
                     "the new worker's recovery", relay)
            for i in range(6):
                send(relay.port, f"s{i}@acme.test", [f"r{i}@dest.test"])
            sink.wait_for(6)
            assert relay.stop() == 0


def test_a_minimum_interval_holds_across_workers(tmp_path: Path) -> None:
    """Both workers have mail for an upstream with min_interval: the starts of all their
    deliveries are spaced, not just each worker's own (relay/limits/partition.py)."""
    with ThreadedSink() as sink:
        cfg = RelayConfig(tmp_path / "relay", workers=2, orgs=ORGS, default_upstream="plain",
                          upstreams={"plain": plain_upstream(sink.port, throttle={
                              "min_interval": "250ms"})}).write()
        deliver_from_both_shards(cfg, sink, 3)
        times = sorted(m.timestamp for m in sink.messages)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Starts are >= 250 ms apart; arrival times add a few ms of jitter either way.
        assert min(gaps) >= 0.2, gaps


def test_fewer_workers_fold_the_surplus_shard_into_shard_zero(tmp_path: Path) -> None:
    with ThreadedSink() as sink:
        cfg = RelayConfig(tmp_path / "relay", upstreams={"plain": plain_upstream(sink.port)},
                          default_upstream="plain", orgs=ORGS).write()  # workers: 1
        orphan = shard_path(cfg / "spool", 1)
        fill(orphan, 4, org="globex")
        with RelayProcess(cfg) as relay:
            sink.wait_for(4)
            assert not orphan.exists()
            relay.wait_events("delivered", 4)


def test_reload_reaches_every_worker_and_a_bad_one_reaches_none(tmp_path: Path) -> None:
    cfg_obj = RelayConfig(tmp_path / "relay", workers=2, orgs=ORGS)
    cfg = cfg_obj.write()
    with RelayProcess(cfg) as relay:
        # `relay reload` without the admin API finds the supervisor through its lock file.
        out = subprocess.run([sys.executable, "-m", "relay.cli", "reload", "-c", str(cfg)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and f"process {relay.proc.pid}" in out.stdout, out  # type: ignore[union-attr]
        wait_for(lambda: relay.output().count("configuration reloaded") == 2, "two reloads", relay)
        (cfg / "relay.yaml").write_text((cfg / "relay.yaml").read_text() + "bogus_key: 1\n")
        relay.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in relay.output(), "the refusal", relay)
        time.sleep(0.3)  # nothing more may arrive: the workers were never signalled
        assert relay.output().count("configuration reloaded") == 2
        assert relay.output().count("reload refused") == 1
        assert relay.stop() == 0


def test_a_worker_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    cfg = RelayConfig(tmp_path / "relay", workers=2).write()
    (cfg / "spool").mkdir()
    (cfg / "spool" / "w1").write_text("not a directory\n")
    relay = RelayProcess(cfg)
    with pytest.raises(RuntimeError, match="exited with 1"):
        relay.start()
    assert "cannot start" in relay.output()


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    cfg = RelayConfig(tmp_path / "relay", workers=2).write()
    relay = RelayProcess(cfg).start()
    workers = worker_pids(relay)
    relay.kill9()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in workers):
        assert time.monotonic() < deadline, f"workers {workers} still running"
        time.sleep(0.05)
    # ... and the next supervisor starts on the same spool.
    with RelayProcess(cfg) as again:
        assert len(worker_pids(again)) == 2


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_a_connection_limit_below_the_worker_count_is_exact(tmp_path: Path) -> None:
    """max_connections 1 with 2 workers cannot be split: the workers share one slot (a
    locked file), and each delivery gets its own connection, so the customer's server
    never sees two at once."""
    with ThreadedSink(script=Script(data_delay=0.15)) as sink:
        cfg = RelayConfig(tmp_path / "relay", workers=2, orgs=ORGS, default_upstream="plain",
                          upstreams={"plain": plain_upstream(sink.port, throttle={
                              "max_connections": 1})}).write()
        out = subprocess.run([sys.executable, "-m", "relay.cli", "check", "-c", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "workers" not in out.stderr, out.stderr
        deliver_from_both_shards(cfg, sink, 4)
        assert sink.max_concurrent == 1


def test_killing_a_worker_mid_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """kill -9 of one worker while three clients stream: the supervisor restarts it and
    every message that got a 250, from either worker, is delivered (duplicates allowed)."""
    with ThreadedSink() as sink:
        cfg = RelayConfig(tmp_path / "relay", upstreams={"plain": plain_upstream(sink.port)},
                          default_upstream="plain", workers=2, orgs=ORGS).write()
        acked: list[str] = []
        stop = threading.Event()
        with RelayProcess(cfg) as relay:

            def stream(n: int) -> None:
                i = 0
                while not stop.is_set() and i < 1000:
                    subject = f"t{n}-{i}"
                    i += 1
                    try:
                        send(relay.port, "a@acme.test", ["r@dest.test"], headers={"Subject": subject})
                    except (OSError, smtplib.SMTPException):
                        continue  # not acknowledged: the client would retry it
                    acked.append(subject)

            threads = [threading.Thread(target=stream, args=(n,)) for n in range(3)]
            for t in threads:
                t.start()
            wait_for(lambda: len(acked) >= 60, "60 acknowledged", relay)
            victim = worker_pids(relay)[1]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: len(acked) >= 120, "120 acknowledged", relay)
            stop.set()
            for t in threads:
                t.join(15)
            assert "exited with status -9" in relay.output()

            def subjects() -> set[str]:
                return {m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                        for m in sink.messages}

            wait_for(lambda: set(acked) <= subjects(), "every acknowledged message", relay, 40)
            assert relay.stop() == 0


def test_redis_shares_the_connection_limit_between_workers(tmp_path: Path) -> None:
    with RedisServer() as redis, ThreadedSink(script=Script(data_delay=0.2)) as sink:
        cfg = RelayConfig(tmp_path / "relay", workers=2, orgs=ORGS, default_upstream="plain",
                          upstreams={"plain": plain_upstream(sink.port, throttle={
                              "max_connections": 2})},
                          limits={"backend": "redis", "redis_url": redis.url,
                                  "node_id": "node-a"}).write()
        deliver_from_both_shards(cfg, sink, 5)
        # Two workers, one limit of 2 in Redis: never more than 2 at once, and both used.
        assert sink.max_concurrent == 2


def test_the_supervisor_api_serves_every_route_of_the_worker_api() -> None:
    """The supervisor's front (fanout.py) and a worker's API (admin.py) list their routes
    separately: a route added to one only would answer 404 with workers > 1."""
    from relay.ops.admin import AdminApi
    from relay.runtime.fanout import Fanout, FanoutApi

    def routes(app: Any) -> set[tuple[str, str]]:
        return {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}

    worker = AdminApi(None, None).app()  # type: ignore[arg-type]
    front = FanoutApi(Fanout([]), listeners=dict, on_reloaded=lambda: None).app()
    assert routes(front) == routes(worker)
