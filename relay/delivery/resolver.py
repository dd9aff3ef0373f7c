"""Turning an upstream's host name into the addresses delivery connects to.

`Resolver` is the interface the deliverer depends on (I/O passed in, so tests can point it
at a loopback DNS server or a static map); `DnsResolver` is the real one: dnspython's
async stub resolver with a TTL-bounded cache, IP literals, "localhost" and a static hosts
map answered without DNS.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver

from relay.core.errors import PermanentError, TemporaryError

_LOCALHOST: dict[int, list[str]] = {socket.AF_INET: ["127.0.0.1"], socket.AF_INET6: ["::1"]}


class Resolver(Protocol):
    async def resolve(self, host: str, family: int) -> list[str]:
        """Addresses of `host` in `family` (AF_INET → A, AF_INET6 → AAAA), in order.

        Raises PermanentError when the name does not exist or has no address of that
        family, TemporaryError when DNS could not answer (SERVFAIL, timeout).
        """
        ...


def _family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _literal(host: str) -> str | None:
    """The IP address if `host` is a literal ("203.0.113.5", "[2001:db8::1]"), else None."""
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if candidate.lower().startswith("ipv6:"):  # RFC 5321 § 4.1.3 address literal
        candidate = candidate[5:]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None


class DnsResolver:
    """A/AAAA lookups through dnspython, cached for the record's TTL.

    `hosts` maps names to addresses answered without DNS (both families mixed; each
    lookup picks its own family), like /etc/hosts. `resolver` is a configured
    dns.asyncresolver.Resolver (default: the system's resolv.conf); `clock` is monotonic
    seconds and exists so tests can expire the cache without sleeping.
    """

    def __init__(
        self,
        hosts: Mapping[str, Sequence[str]] | None = None,
        *,
        resolver: dns.asyncresolver.Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        lifetime: float = 10.0,
        max_ttl: float = 3600.0,
        max_entries: int = 4096,
    ) -> None:
        self._hosts = {
            name.lower().rstrip("."): list(addrs) for name, addrs in (hosts or {}).items()
        }
        self._resolver = resolver
        self._clock = clock
        self._lifetime = lifetime
        self._max_ttl = max_ttl
        self._max_entries = max_entries
        self._cache: dict[tuple[str, int], tuple[float, list[str]]] = {}

    async def resolve(self, host: str, family: int) -> list[str]:
        literal = _literal(host.strip())
        if literal is not None:
            return [literal]
        name = host.strip().lower().rstrip(".")
        if not name:
            raise PermanentError("empty host name", code=550, enhanced="5.1.2")
        if name in self._hosts:
            found = [a for a in self._hosts[name] if _family_of(a) == family]
            if not found:
                raise PermanentError(
                    f"{name} has no {self._rdtype(family)} address in the static hosts map",
                    code=550,
                    enhanced="5.1.2",
                )
            return found
        if name == "localhost":
            return list(_LOCALHOST[family])

        now = self._clock()
        cached = self._cache.get((name, family))
        if cached is not None and cached[0] > now:
            return list(cached[1])

        addresses, ttl = await self._query(name, family)
        if len(self._cache) >= self._max_entries:
            # Bounded memory: drop expired entries, and if that is not enough, everything.
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
        self._cache[(name, family)] = (now + min(ttl, self._max_ttl), addresses)
        return list(addresses)

    @staticmethod
    def _rdtype(family: int) -> str:
        return "AAAA" if family == socket.AF_INET6 else "A"

    async def _query(self, name: str, family: int) -> tuple[list[str], float]:
        rdtype = self._rdtype(family)
        if self._resolver is None:
            self._resolver = dns.asyncresolver.Resolver()
        try:
            answer = await self._resolver.resolve(
                name, rdtype, search=False, lifetime=self._lifetime
            )
        except dns.resolver.NXDOMAIN as exc:
            raise PermanentError(
                f"{name}: no such domain (NXDOMAIN)", code=550, enhanced="5.1.2"
            ) from exc
        except dns.resolver.NoAnswer as exc:
            raise PermanentError(f"{name}: no {rdtype} record", code=550, enhanced="5.1.2") from exc
        except dns.resolver.NoNameservers as exc:
            raise TemporaryError(
                f"{name}: DNS servers failed to answer (SERVFAIL)", enhanced="4.4.3"
            ) from exc
        except dns.exception.Timeout as exc:
            raise TemporaryError(f"{name}: DNS lookup timed out", enhanced="4.4.3") from exc
        except dns.exception.DNSException as exc:
            raise TemporaryError(f"{name}: DNS lookup failed: {exc}", enhanced="4.4.3") from exc
        if answer.rrset is None:
            raise PermanentError(f"{name}: no {rdtype} record", code=550, enhanced="5.1.2")
        addresses = [rdata.to_text() for rdata in answer.rrset]
        return addresses, float(answer.rrset.ttl)
