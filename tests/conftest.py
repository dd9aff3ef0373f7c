"""Shared fixtures: a private certificate authority and started SMTP sinks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certs import CertAuthority
from tests.redisproc import RedisServer
from tests.sinks import Sink

MakeSink = Callable[..., Coroutine[Any, Any, Sink]]


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    """A trustme CA; clients trust `ca.ca_file`, sinks serve `ca.server_context(name)`."""
    return CertAuthority(Path(tmp_path_factory.mktemp("ca")))


@pytest.fixture
async def make_sink() -> AsyncIterator[MakeSink]:
    """`sink = await make_sink(tls=..., auth=..., script=...)`: started now, stopped after."""
    sinks: list[Sink] = []

    async def make(**kwargs: Any) -> Sink:
        sink = await Sink(**kwargs).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, empty, stopped after the test."""
    with RedisServer() as server:
        yield server
