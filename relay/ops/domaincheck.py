"""Domain check (`relay check-domain`): what receivers will look up for a sender domain —
SPF, DMARC, DKIM — checked against how the relay routes that domain's mail, with the exact
records to publish for whatever is missing or wrong.

The organisation owning the domain is routed like its mail (its upstream, its members'
personal choices unless it enforces its own); each upstream needs SPF to authorise it:
SendGrid's `include:sendgrid.net`, Mailjet's `include:spf.mailjet.com`, or for a customer's
own server the relay's egress addresses (`ip4:` / `ip6:`; what that server sees). DNS is
read through a small `TxtResolver` interface so tests pass fixed answers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver

from relay.config.model import Config
from relay.core.model import EgressPool, Upstream
from relay.policy import Attribution, route
from relay.policy.egress import sources_in

SENDGRID_SPF = "include:sendgrid.net"
MAILJET_SPF = "include:spf.mailjet.com"
MAX_SPF_LOOKUPS = 10  # RFC 7208 § 4.6.4: more DNS-querying terms than this is a permerror

OK, MISSING, WRONG, ERROR = "OK", "MISSING", "WRONG", "ERROR"


class LookupFailed(Exception):
    """DNS could not answer (SERVFAIL, timeout): neither present nor absent."""


class TxtResolver(Protocol):
    async def txt(self, name: str) -> list[str] | None:
        """The TXT records at `name` (each record's strings joined), or None when the name
        or the record type does not exist. Raises LookupFailed when DNS cannot answer."""
        ...


class DnsTxtResolver:
    """The real one: dnspython's stub resolver (the system's, or the given nameservers)."""

    def __init__(self, nameservers: list[str] | None = None, lifetime: float = 5.0) -> None:
        self._resolver = dns.asyncresolver.Resolver()
        if nameservers:
            self._resolver.nameservers = list(nameservers)
        self._lifetime = lifetime

    async def txt(self, name: str) -> list[str] | None:
        try:
            answer = await self._resolver.resolve(
                name, "TXT", search=False, lifetime=self._lifetime
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.Timeout as exc:
            raise LookupFailed(f"{name}: DNS lookup timed out") from exc
        except dns.exception.DNSException as exc:
            raise LookupFailed(f"{name}: {exc}") from exc
        if answer.rrset is None:
            return None
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]


class StaticTxtResolver:
    """Fixed answers (tests, and dry runs): name → TXT strings; a LookupFailed value fails."""

    def __init__(self, records: Mapping[str, list[str] | LookupFailed]) -> None:
        self._records = {k.lower().rstrip("."): v for k, v in records.items()}

    async def txt(self, name: str) -> list[str] | None:
        value = self._records.get(name.lower().rstrip("."))
        if isinstance(value, LookupFailed):
            raise value
        return list(value) if value is not None else None


@dataclass
class Finding:
    check: str  # "SPF", "DMARC", "DKIM s1"
    status: str  # OK | MISSING | WRONG | ERROR
    detail: str
    found: list[str] = field(default_factory=list)  # what DNS has now
    publish: list[str] = field(default_factory=list)  # exact records, zone-file syntax


@dataclass
class DomainReport:
    domain: str
    org: str | None
    routes: list[str]  # "sendgrid via pool us", ...
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status == OK for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def as_text(self) -> str:
        owner = f"organisation {self.org}" if self.org else "no organisation (default route)"
        lines = [f"domain {self.domain}: {owner}; mail goes to {', '.join(self.routes)}"]
        for f in self.findings:
            lines.append(f"{f.check:<12} {f.status:<8} {f.detail}")
            for rec in f.found:
                lines.append(f"  found:   {rec}")
            for rec in f.publish:
                lines.append(f"  publish: {rec}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(
            "result: " + ("everything is in place" if self.ok else "records to publish above")
        )
        return "\n".join(lines)


# -- what each upstream needs --------------------------------------------------------------


def provider(upstream: Upstream) -> str:
    """sendgrid | mailjet | customer."""
    host = upstream.host.lower()
    if upstream.id == "sendgrid" or host == "sendgrid.net" or host.endswith(".sendgrid.net"):
        return "sendgrid"
    if upstream.id == "mailjet" or host == "mailjet.com" or host.endswith(".mailjet.com"):
        return "mailjet"
    return "customer"


def routes_of(config: Config, org_id: str) -> list[tuple[Upstream, EgressPool]]:
    """Every (upstream, pool) the organisation's mail can take: its own route and, unless it
    enforces it, each member's personal choice."""
    accounts = [""]
    org = config.orgs.get(org_id)
    if org is not None and not org.enforce:
        accounts += list(org.members)
    seen: dict[str, tuple[Upstream, EgressPool]] = {}
    for account in accounts:
        r = route(config, Attribution(org_id, account, "check-domain"))
        seen.setdefault(f"{r.upstream.id}@{r.pool.name}", (r.upstream, r.pool))
    return list(seen.values())


def required_spf(config: Config, routes: list[tuple[Upstream, EgressPool]]) -> list[str]:
    """The SPF mechanisms that must be (directly or through includes) in the record."""
    need: list[str] = []
    for upstream, pool in routes:
        kind = provider(upstream)
        if kind == "sendgrid":
            terms = [SENDGRID_SPF]
        elif kind == "mailjet":
            terms = [MAILJET_SPF]
        else:
            terms = [
                ("ip6:" if ":" in s.address else "ip4:") + s.address
                for s in sources_in(config, pool.name)
            ]
        need += [t for t in terms if t not in need]
    return need


def default_selectors(routes: list[tuple[Upstream, EgressPool]]) -> list[str]:
    out: list[str] = []
    for upstream, _ in routes:
        kind = provider(upstream)
        for sel in {"sendgrid": ["s1", "s2"], "mailjet": ["mailjet"]}.get(kind, []):
            if sel not in out:
                out.append(sel)
    return out


# -- SPF ------------------------------------------------------------------------------------


@dataclass
class SpfView:
    """What an SPF record (with its includes and redirect) authorises, as far as we evaluate."""

    includes: set[str] = field(default_factory=set)
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    lookups: int = 0
    problems: list[str] = field(default_factory=list)
    unevaluated: set[str] = field(default_factory=set)


def spf_records(txts: list[str] | None) -> list[str]:
    return [t for t in (txts or []) if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


async def _walk_spf(resolver: TxtResolver, record: str, view: SpfView, depth: int) -> None:
    for term in record.split()[1:]:
        qualifier = term[0] if term[0] in "+-~?" else "+"
        body = term[1:] if term[0] in "+-~?" else term
        name, _, arg = body.partition(":")
        name = name.lower()
        if name.startswith("redirect="):
            name, arg = "redirect", body.partition("=")[2]
        if name in ("include", "redirect"):
            view.lookups += 1
            if qualifier == "+":
                view.includes.add(arg.lower().rstrip("."))
            if view.lookups > MAX_SPF_LOOKUPS:
                view.problems.append(
                    f"more than {MAX_SPF_LOOKUPS} DNS lookups: receivers give up (RFC 7208 § 4.6.4)"
                )
                return
            if depth < MAX_SPF_LOOKUPS and qualifier == "+":
                try:
                    found = spf_records(await resolver.txt(arg))
                except LookupFailed as exc:
                    view.problems.append(f"{name} {arg}: {exc}")
                    continue
                if len(found) == 1:
                    await _walk_spf(resolver, found[0], view, depth + 1)
                elif not found:
                    view.problems.append(f"{name}:{arg} has no SPF record (receivers fail it)")
        elif name in ("ip4", "ip6") and qualifier == "+":
            try:
                view.networks.append(ipaddress.ip_network(arg, strict=False))
            except ValueError:
                view.problems.append(f"'{term}' is not a valid network")
        elif name in ("a", "mx", "ptr", "exists"):
            view.lookups += 1
            view.unevaluated.add(name)


def _authorised(term: str, view: SpfView) -> bool:
    kind, _, arg = term.partition(":")
    if kind == "include":
        return arg in view.includes
    address = ipaddress.ip_address(arg)
    return any(address.version == n.version and address in n for n in view.networks)


def _with_terms(record: str, missing: list[str]) -> str:
    """The record with `missing` added just before its `all` / `redirect=` (or at the end)."""
    terms = record.split()
    for i, t in enumerate(terms):
        bare = t.lstrip("+-~?").lower()
        if bare == "all" or bare.startswith("redirect="):
            return " ".join([*terms[:i], *missing, *terms[i:]])
    return " ".join([*terms, *missing])


async def check_spf(resolver: TxtResolver, domain: str, need: list[str]) -> Finding:
    try:
        found = spf_records(await resolver.txt(domain))
    except LookupFailed as exc:
        return Finding("SPF", ERROR, f"cannot read the SPF record: {exc}")
    want = " ".join(need)
    if not found:
        return Finding(
            "SPF",
            MISSING,
            f"no SPF record at {domain}",
            publish=[f'{domain}. IN TXT "v=spf1 {want} ~all"'],
        )
    if len(found) > 1:
        merged = _with_terms(found[0], [t for t in need if t not in found[0].split()])
        return Finding(
            "SPF",
            WRONG,
            f"{len(found)} SPF records: receivers treat that as an error (RFC 7208"
            " § 4.5); replace them with one",
            found=found,
            publish=[f'{domain}. IN TXT "{merged}"'],
        )
    view = SpfView()
    await _walk_spf(resolver, found[0], view, 0)
    missing = [t for t in need if not _authorised(t, view)]
    if missing:
        detail = f"does not authorise {' '.join(missing)}"
        if view.unevaluated:
            detail += f" (its {', '.join(sorted(view.unevaluated))} terms are not evaluated here)"
        return Finding(
            "SPF",
            WRONG,
            detail,
            found=found,
            publish=[f'{domain}. IN TXT "{_with_terms(found[0], missing)}"'],
        )
    if view.problems:
        return Finding("SPF", WRONG, "; ".join(view.problems), found=found)
    last = found[0].split()[-1].lower()
    if last in ("+all", "all"):
        return Finding(
            "SPF",
            WRONG,
            "ends in +all: it authorises every server on the Internet",
            found=found,
            publish=[f'{domain}. IN TXT "{found[0][: -len(last)]}~all"'],
        )
    return Finding("SPF", OK, f"authorises {want}", found=found)


# -- DMARC and DKIM -------------------------------------------------------------------------


def _tags(record: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in record.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            out[key.strip().lower()] = value.strip()
    return out


async def check_dmarc(resolver: TxtResolver, domain: str) -> Finding:
    labels = domain.split(".")
    # RFC 7489 § 6.6.3: without a record at the domain, the organisational domain's applies
    # (approximated by walking up to the last two labels; no public-suffix list here).
    for i in range(max(1, len(labels) - 1)):
        name = "_dmarc." + ".".join(labels[i:])
        try:
            records = [
                t for t in await resolver.txt(name) or [] if t.lower().startswith("v=dmarc1")
            ]
        except LookupFailed as exc:
            return Finding("DMARC", ERROR, f"cannot read {name}: {exc}")
        if not records:
            continue
        inherited = "" if i == 0 else f" (inherited from {name})"
        if len(records) > 1:
            return Finding(
                "DMARC", WRONG, f"{len(records)} DMARC records at {name}; keep one", found=records
            )
        policy = _tags(records[0]).get("p", "").lower()
        if policy not in ("none", "quarantine", "reject"):
            return Finding(
                "DMARC",
                WRONG,
                f"no valid p= policy{inherited}",
                found=records,
                publish=[f'{name}. IN TXT "v=DMARC1; p=none; {_rua(domain)}"'],
            )
        note = " (monitoring only)" if policy == "none" else ""
        return Finding("DMARC", OK, f"p={policy}{note}{inherited}", found=records)
    return Finding(
        "DMARC",
        MISSING,
        f"no DMARC record at _dmarc.{domain}",
        publish=[f'_dmarc.{domain}. IN TXT "v=DMARC1; p=none; {_rua(domain)}"'],
    )


def _rua(domain: str) -> str:
    return f"rua=mailto:dmarc-reports@{domain}"


def _dkim_publish(selector: str, domain: str, kinds: set[str]) -> str:
    name = f"{selector}._domainkey.{domain}."
    if "sendgrid" in kinds and selector in ("s1", "s2"):
        return (
            f"{name} IN CNAME {selector}.domainkey.u<ID>.wl<ID>.sendgrid.net."
            "  (exact target: SendGrid > Settings > Sender Authentication)"
        )
    if "mailjet" in kinds and selector == "mailjet":
        return (
            f'{name} IN TXT "k=rsa; p=<public key>"'
            "  (the key: Mailjet > Account settings > Domains > SPF/DKIM authentication)"
        )
    return f'{name} IN TXT "v=DKIM1; k=rsa; p=<public key of the server that signs>"'


async def check_dkim(resolver: TxtResolver, domain: str, selector: str, kinds: set[str]) -> Finding:
    name = f"{selector}._domainkey.{domain}"
    check = f"DKIM {selector}"
    try:
        records = await resolver.txt(name)  # a CNAME (SendGrid) is followed by the resolver
    except LookupFailed as exc:
        return Finding(check, ERROR, f"cannot read {name}: {exc}")
    keys = [r for r in records or [] if "p=" in r.replace(" ", "")]
    if not keys:
        return Finding(
            check,
            MISSING,
            f"no DKIM key at {name}",
            found=list(records or []),
            publish=[_dkim_publish(selector, domain, kinds)],
        )
    if _tags(keys[0]).get("p", "") == "":
        return Finding(
            check,
            WRONG,
            f"the key at {name} is revoked (empty p=)",
            found=keys,
            publish=[_dkim_publish(selector, domain, kinds)],
        )
    return Finding(
        check,
        OK,
        f"key published at {name}",
        found=[k[:60] + ("…" if len(k) > 60 else "") for k in keys],
    )


# -- the whole check ------------------------------------------------------------------------


async def check_domain(config: Config, domain: str, resolver: TxtResolver) -> DomainReport:
    domain = domain.strip().lower().rstrip(".")
    org_id = config.org_of_domain(domain)
    routes = routes_of(config, org_id or config.relay.attribution.default_org)
    report = DomainReport(domain, org_id, [f"{u.id} (egress pool {p.name})" for u, p in routes])
    if org_id is None:
        report.notes.append(f"no organisation claims {domain}; its mail takes the default route")
    report.findings.append(await check_spf(resolver, domain, required_spf(config, routes)))
    report.findings.append(await check_dmarc(resolver, domain))
    org = config.orgs.get(org_id) if org_id else None
    selectors = (
        list(org.dkim_selectors) if org and org.dkim_selectors else default_selectors(routes)
    )
    kinds = {provider(u) for u, _ in routes}
    if not selectors:
        report.notes.append(
            "no DKIM selectors to check: list the customer server's selectors under"
            f" dkim_selectors in {org.file if org else 'the organisation file'}"
        )
    for sel in selectors:
        report.findings.append(await check_dkim(resolver, domain, sel, kinds))
    if "customer" in kinds:
        report.notes.append(
            "a customer's own server relays the mail onward from its own addresses, which its"
            " SPF must list too; the egress addresses above are what that server sees"
        )
    return report
