"""After start-up a worker freezes what start-up built and collects its youngest generation
less often (relay/runtime/serve.py settle_gc; benchmarks/RESULTS.md §15)."""

from __future__ import annotations

import gc
import re
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import load_config
from relay.runtime.node import Relay
from relay.runtime.serve import GC_YOUNG, settle_gc
from tests.relayproc import RelayConfig, RelayProcess

FROZEN = re.compile(r"gc: (\d+) objects frozen after start-up; the youngest generation is"
                    r" collected every (\d+) allocations")


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()  # this test process must not keep its objects out of the collector
    gc.set_threshold(*threshold)


def test_settle_gc_freezes_start_up_and_raises_the_young_threshold(restored_gc: None) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    gen0, gen1, gen2 = gc.get_threshold()
    settle_gc()
    assert gc.get_freeze_count() > 1000  # at least the modules imported so far
    assert gc.get_threshold() == (max(gen0, GC_YOUNG), gen1, gen2)
    assert GC_YOUNG > 700  # Python's default: the point of the setting


def test_a_serving_relay_settles_its_gc_once_started(tmp_path: Path) -> None:
    cfg = RelayConfig(tmp_path / "relay")
    cfg.doc["log"]["level"] = "debug"
    with RelayProcess(cfg.write()) as relay:
        deadline = time.monotonic() + 10
        found = None
        while found is None and time.monotonic() < deadline:
            found = next((m for m in map(FROZEN.search, relay.stderr) if m), None)
            time.sleep(0.05)
        assert found is not None, relay.output()
        assert int(found.group(1)) > 10_000  # modules, configuration, the node
        assert int(found.group(2)) == GC_YOUNG
        listening = next(i for i, line in enumerate(relay.stderr) if "listening" in line)
        assert relay.stderr.index(found.string) > listening  # after the node started


async def test_replaced_configurations_are_freed_after_settle_gc(
    tmp_path: Path, restored_gc: None
) -> None:
    # Freezing keeps start-up's objects from the collector; what replaces them on a reload
    # must still go (reference counting for the frozen first configuration, the collector
    # for later ones): nothing may pile up per reload.
    path = RelayConfig(tmp_path / "relay").write()
    node = Relay(load_config(str(path)), str(path))
    await node.start()
    try:
        settle_gc()
        replaced: list[weakref.ref[object]] = []
        for _ in range(5):
            replaced.append(weakref.ref(node.config))
            assert await node.reload()
        gc.collect()
        assert [r for r in replaced if r() is not None] == []
    finally:
        await node.stop()
