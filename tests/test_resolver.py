"""DnsResolver against a real UDP DNS server on loopback that answers from a table
(DNS answers are faked; the resolver, sockets and wire format are real)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from relay.core.errors import PermanentError, TemporaryError
from relay.delivery import DnsResolver


@dataclass
class Zone:
    """name → {"A": [...], "AAAA": [...]}, plus names that SERVFAIL or never answer."""

    records: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    ttl: int = 300
    servfail: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (Python 3.11's selector datagram transport does not subclass DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.zone.queries.append((name, rdtype))
        if name in self.zone.silent:
            return
        response = dns.message.make_response(query)
        if name in self.zone.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.zone.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            addresses = self.zone.records[name].get(rdtype, [])
            if addresses:
                response.answer.append(
                    dns.rrset.from_text_list(
                        question.name, self.zone.ttl, dns.rdataclass.IN, rdtype, addresses
                    )
                )
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def zone() -> AsyncIterator[tuple[Zone, int]]:
    zone = Zone()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _DnsProtocol(zone), local_addr=("127.0.0.1", 0)
    )
    port: int = transport.get_extra_info("sockname")[1]
    yield zone, port
    transport.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stub(port: int) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    return resolver


async def test_a_and_aaaa_by_family(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.records["mx.example.test"] = {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"]}
    r = DnsResolver(resolver=stub(port))
    # (An RRset has no order: DNS servers rotate it.)
    assert sorted(await r.resolve("MX.Example.Test.", socket.AF_INET)) == ["192.0.2.1", "192.0.2.2"]
    assert await r.resolve("mx.example.test", socket.AF_INET6) == ["2001:db8::1"]
    assert z.queries == [("mx.example.test", "A"), ("mx.example.test", "AAAA")]


async def test_answers_are_cached_for_their_ttl(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.ttl = 60
    z.records["mx.example.test"] = {"A": ["192.0.2.1"]}
    clock = FakeClock()
    r = DnsResolver(resolver=stub(port), clock=clock)
    assert await r.resolve("mx.example.test", socket.AF_INET) == ["192.0.2.1"]
    z.records["mx.example.test"] = {"A": ["192.0.2.9"]}
    clock.now += 59
    assert await r.resolve("mx.example.test", socket.AF_INET) == ["192.0.2.1"]
    assert len(z.queries) == 1
    clock.now += 2
    assert await r.resolve("mx.example.test", socket.AF_INET) == ["192.0.2.9"]
    assert len(z.queries) == 2


async def test_nxdomain_and_no_record_are_permanent(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.records["v4only.example.test"] = {"A": ["192.0.2.1"]}
    r = DnsResolver(resolver=stub(port))
    with pytest.raises(PermanentError, match="NXDOMAIN") as nx:
        await r.resolve("nope.example.test", socket.AF_INET)
    assert nx.value.enhanced == "5.1.2"
    with pytest.raises(PermanentError, match="no AAAA record"):
        await r.resolve("v4only.example.test", socket.AF_INET6)


async def test_servfail_and_timeout_are_temporary(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.servfail.add("broken.example.test")
    z.silent.add("slow.example.test")
    r = DnsResolver(resolver=stub(port), lifetime=0.3)
    with pytest.raises(TemporaryError, match="SERVFAIL") as sf:
        await r.resolve("broken.example.test", socket.AF_INET)
    assert sf.value.enhanced == "4.4.3"
    with pytest.raises(TemporaryError, match="timed out"):
        await r.resolve("slow.example.test", socket.AF_INET)


@pytest.mark.parametrize(
    ("host", "family", "expected"),
    [
        ("127.0.0.1", socket.AF_INET, ["127.0.0.1"]),
        ("[192.0.2.5]", socket.AF_INET, ["192.0.2.5"]),
        ("::1", socket.AF_INET6, ["::1"]),
        ("[IPv6:2001:db8::5]", socket.AF_INET6, ["2001:db8::5"]),
        ("localhost", socket.AF_INET, ["127.0.0.1"]),
        ("localhost", socket.AF_INET6, ["::1"]),
        ("smtp.sendgrid.net", socket.AF_INET, ["127.0.0.1", "127.0.0.4"]),
        ("SMTP.SendGrid.net.", socket.AF_INET6, ["::1"]),
    ],
)
async def test_literals_localhost_and_static_hosts_need_no_dns(
    zone: tuple[Zone, int], host: str, family: int, expected: list[str]
) -> None:
    z, port = zone
    r = DnsResolver({"smtp.sendgrid.net": ["127.0.0.1", "::1", "127.0.0.4"]}, resolver=stub(port))
    assert await r.resolve(host, family) == expected
    assert z.queries == []


async def test_static_host_without_the_family_is_permanent() -> None:
    r = DnsResolver({"v4.test": ["127.0.0.1"]})
    with pytest.raises(PermanentError, match="no AAAA address"):
        await r.resolve("v4.test", socket.AF_INET6)
