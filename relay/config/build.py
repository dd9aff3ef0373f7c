"""Cross-checks across all files and construction of the runtime `Config`.

Everything here that can be wrong is reported as `file:line: message` at the line of the
offending key, all at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from relay.config import oauth as oauth_conf
from relay.config.errors import ConfigError
from relay.config.model import Config, Member, Org
from relay.config.notify_build import check_org_notify, check_relay_notify
from relay.config.providers import PROFILES, throttle_defaults
from relay.config.schema import OrgConf, RelayConf, UpstreamConf
from relay.config.secrets import SecretUnavailable, is_reference, resolve_secret
from relay.config.usage import first_uses, unresolved_warnings
from relay.config.yamlsrc import Located
from relay.config.yamlsrc import Path as YPath
from relay.core.model import (
    EgressPool,
    EgressSource,
    OAuthSettings,
    Secret,
    Throttle,
    TlsMode,
    Upstream,
)

# Built-in presets (docs/architecture.md): always defined, so a config only has to add credentials.
PRESETS: dict[str, dict[str, object]] = {
    "sendgrid": {
        "host": "smtp.sendgrid.net",
        "port": 587,
        "tls": "starttls",
        "username": "apikey",
        "password": "env:SENDGRID_API_KEY",
        "region": "us",
    },
    "mailjet": {
        "host": "in-v3.mailjet.com",
        "port": 587,
        "tls": "starttls",
        "username": "env:MAILJET_API_KEY",
        "password": "env:MAILJET_SECRET_KEY",
        "region": "eu",
    },
}
IMPLICIT_PORTS = {465}
STARTTLS_PORTS = {25, 587, 2525}


class Builder:
    def __init__(self, environ: Mapping[str, str] | None) -> None:
        self.errors: list[ConfigError] = []
        self.warnings: list[ConfigError] = []
        self.environ = os.environ if environ is None else environ
        # Upstream id -> the reference its username came from (a Mailjet API key is half a
        # credential): `relay route` shows the reference, never the resolved value.
        self.username_refs: dict[str, str] = {}
        # Upstream id -> why its credential is unavailable; warned only where mail is routed
        # to it (relay/config/usage.py).
        self.unresolved: dict[str, str] = {}

    def err(self, src: Located, path: YPath, message: str) -> None:
        self.errors.append(ConfigError(src.file, src.line_of(path), message))

    def warn(self, src: Located, path: YPath, message: str) -> None:
        self.warnings.append(ConfigError(src.file, src.line_of(path), message))

    # -- upstreams ---------------------------------------------------------------------
    def upstream(
        self,
        uid: str,
        conf: UpstreamConf,
        src: Located,
        path: YPath,
        pools: Mapping[str, EgressPool],
        default_pool: str,
        base_dir: Path,
    ) -> Upstream | None:
        # A global upstream named like a preset inherits it unless it names another preset.
        preset = conf.preset or (uid if uid in PRESETS else None)
        merged: dict[str, object] = dict(PRESETS[preset]) if preset else {}
        profile = PROFILES[conf.provider] if conf.provider else None
        if profile is not None:
            merged.update(host=profile.host, port=profile.port, tls=profile.tls)
        for key in ("host", "port", "tls", "username", "password"):
            value = getattr(conf, key)
            if value is not None:
                merged[key] = value
        missing = [k for k in ("host", "port", "tls") if merged.get(k) is None]
        if missing:
            self.err(src, path, f"upstream '{uid}' needs {', '.join(missing)} (or a preset)")
            return None
        host, port, tls = str(merged["host"]), int(str(merged["port"])), TlsMode(str(merged["tls"]))
        if tls is TlsMode.NONE and not conf.allow_plaintext:
            self.err(
                src,
                (*path, "tls"),
                f"upstream '{uid}': tls: none sends credentials and mail"
                " in clear; set allow_plaintext: true to accept that",
            )
        if not conf.allow_tls_port_mismatch:
            if tls is TlsMode.IMPLICIT and port in STARTTLS_PORTS:
                self.err(
                    src,
                    (*path, "port"),
                    f"upstream '{uid}': port {port} usually speaks"
                    " STARTTLS, not implicit TLS (use tls: starttls, or set"
                    " allow_tls_port_mismatch: true)",
                )
            if tls is not TlsMode.IMPLICIT and port in IMPLICIT_PORTS:
                self.err(
                    src,
                    (*path, "port"),
                    f"upstream '{uid}': port {port} expects implicit"
                    f" TLS, not {tls.value} (use tls: implicit, or set"
                    " allow_tls_port_mismatch: true)",
                )
        pool = conf.pool or default_pool
        # An undefined default_pool is reported once, on its own line, not per upstream.
        if pool not in pools and (conf.pool or default_pool in pools):
            self.err(
                src,
                (*path, "pool") if conf.pool else path,
                f"upstream '{uid}' uses egress pool '{pool}', which is not defined",
            )
        unavailable: str | None = None
        username = merged.get("username")
        password: Secret | None = None
        auth = conf.auth or ("xoauth2" if conf.oauth else "password")
        oauth: OAuthSettings | None = None
        if auth == "xoauth2":
            if conf.password:
                self.err(src, (*path, "password"), f"upstream '{uid}': auth: xoauth2 logs in"
                         " with a token, not a password (remove password)")
            for where, message in oauth_conf.check(
                conf.oauth, profile.idp if profile else None, conf.username
            ):
                self.err(src, (*path, *where), f"upstream '{uid}': {message}")
        try:
            if isinstance(username, str) and is_reference(username):
                self.username_refs[uid] = username
                username = resolve_secret(
                    username, base_dir=base_dir, environ=self.environ
                ).reveal()
            ref = merged.get("password")
            if isinstance(ref, str):
                password = resolve_secret(ref, base_dir=base_dir, environ=self.environ)
            if auth == "xoauth2" and conf.oauth is not None:
                oauth = oauth_conf.settings(
                    conf.oauth, profile.idp if profile else None, base_dir, self.environ
                )
        except SecretUnavailable as exc:
            unavailable = f"credential unavailable: {exc}"
            self.unresolved[uid] = str(exc)
        if conf.ca_file and not (base_dir / conf.ca_file).exists():
            self.err(
                src, (*path, "ca_file"), f"upstream '{uid}': ca_file {conf.ca_file} does not exist"
            )
        if not conf.verify_tls:
            self.warn(
                src, (*path, "verify_tls"), f"upstream '{uid}': TLS certificate verification is OFF"
            )
        t = conf.throttle.model_copy(
            update=throttle_defaults(conf.provider, set(conf.throttle.model_fields_set))
        )
        return Upstream(
            id=uid,
            host=host,
            port=port,
            tls=tls,
            pool=pool,
            username=str(username) if username is not None else None,
            password=password,
            from_address=conf.from_address,
            verify_tls=conf.verify_tls,
            ca_file=str(base_dir / conf.ca_file) if conf.ca_file else None,
            throttle=Throttle(
                t.max_connections,
                t.min_interval,
                t.max_messages_per_connection,
                t.hourly,
                t.daily,
                tuple(t.quotas),
            ),
            connect_timeout=conf.connect_timeout,
            command_timeout=conf.command_timeout,
            data_timeout=conf.data_timeout,
            unavailable=unavailable,
            auth=auth,
            oauth=oauth,
            provider=conf.provider or preset,
            verify=conf.verify,
            previous=conf.previous,
            fingerprint=oauth_conf.fingerprint(
                host, port, tls.value, str(username or ""), auth, conf.password,
                conf.oauth, self.username_refs.get(uid),
            ),
            region=conf.region or (str(merged["region"]) if merged.get("region") else None),
        )

    def previous(
        self,
        u: Upstream,
        oc: OrgConf | None,
        global_confs: Mapping[str, UpstreamConf],
        src: Located,
        path: YPath,
    ) -> Upstream:
        """`previous:` resolved like any upstream name (the organisation's own first)."""
        if u.previous is None:
            return u
        name = u.previous
        if oc is not None and name in oc.upstreams:
            resolved = f"{oc.org}/{name}"
        elif name in global_confs:
            resolved = name
        else:
            self.err(src, (*path, "previous"), f"upstream '{u.id}': previous upstream '{name}'"
                     " is not defined")
            return u
        if resolved == u.id:
            self.err(src, (*path, "previous"), f"upstream '{u.id}' cannot be its own previous")
        return replace(u, previous=resolved)

    def failover(
        self,
        oc: OrgConf,
        src: Located,
        scoped: Callable[[str, YPath], str | None],
        upstreams: Mapping[str, Upstream],
    ) -> dict[str, Any]:
        """An organisation's failover settings, its list resolved like its upstream."""
        chain = []
        for i, name in enumerate(oc.failover):
            uid = scoped(name, ("failover", i))
            if uid is None:
                continue
            chain.append(uid)
            up = upstreams.get(uid)
            if (up is not None and oc.region and up.region != oc.region
                    and not oc.failover_outside_region):
                self.warn(src, ("failover", i),
                          f"failover upstream '{name}' is in region {up.region or 'unknown'},"
                          f" outside the organisation's region {oc.region}: it is never used"
                          " (failover_outside_region: true allows it)")
        return {
            "failover": tuple(chain),
            "failover_after": oc.failover_after,
            "failover_deferrals": oc.failover_after_deferrals,
            "region": oc.region,
            "failover_outside_region": oc.failover_outside_region,
            "failover_from_own_servers": oc.failover_from_own_servers,
        }

    # -- the whole configuration -------------------------------------------------------
    def build(
        self,
        relay: RelayConf,
        rsrc: Located,
        orgs: list[tuple[OrgConf, Located]],
        base_dir: Path,
    ) -> Config | None:
        sources = {n: EgressSource(n, s.address, s.ehlo) for n, s in relay.egress_sources.items()}
        seen_addr: dict[str, str] = {}
        for n, s in relay.egress_sources.items():
            if s.address in seen_addr:
                self.err(
                    rsrc,
                    ("egress_sources", n, "address"),
                    f"egress source '{n}' reuses address {s.address} of '{seen_addr[s.address]}'",
                )
            seen_addr.setdefault(s.address, n)
        pools: dict[str, EgressPool] = {}
        for pname, pool_members in relay.egress_pools.items():
            if not pool_members:
                self.err(rsrc, ("egress_pools", pname), f"egress pool '{pname}' is empty")
            for i, m in enumerate(pool_members):
                if m not in sources:
                    self.err(
                        rsrc,
                        ("egress_pools", pname, i),
                        f"egress pool '{pname}' names source '{m}', which is not defined",
                    )
            pools[pname] = EgressPool(
                pname, tuple(sources[m] for m in pool_members if m in sources)
            )
        if relay.default_pool not in pools:
            self.err(rsrc, ("default_pool",), f"default_pool '{relay.default_pool}' is not defined")
        for i, lst in enumerate(relay.listeners):
            if lst.tls != "none" and not (lst.cert_file and lst.key_file):
                self.err(
                    rsrc,
                    ("listeners", i, "tls"),
                    f"listener '{lst.name}' with tls: {lst.tls} needs cert_file and key_file",
                )
        if relay.limits.backend == "redis" and not relay.limits.redis_url:
            self.err(rsrc, ("limits", "backend"), "limits backend redis needs redis_url")
        if relay.admin.enabled and relay.admin.token is None and ("admin",) in rsrc.lines:
            self.warn(
                rsrc,
                ("admin",),
                "admin API has no token: only /healthz, /readyz and /metrics are served",
            )
        elif relay.admin.enabled and relay.admin.token is not None:
            try:
                resolve_secret(relay.admin.token, base_dir=base_dir, environ=self.environ)
            except SecretUnavailable as exc:
                self.warn(rsrc, ("admin", "token"), f"admin token: {exc}")

        upstreams: dict[str, Upstream] = {}
        global_confs = {name: UpstreamConf(preset=name) for name in PRESETS}  # type: ignore[arg-type]
        global_confs.update(relay.upstreams)
        for name, conf in global_confs.items():
            path: YPath = ("upstreams", name) if name in relay.upstreams else ()
            u = self.upstream(name, conf, rsrc, path, pools, relay.default_pool, base_dir)
            if u:
                upstreams[name] = self.previous(u, None, global_confs, rsrc, path)
        default_upstream = relay.default_upstream or "sendgrid"
        if default_upstream in upstreams and upstreams[default_upstream].verify:
            self.err(rsrc, ("default_upstream",), f"default_upstream '{default_upstream}' has"
                     " verify: true; the default is where mail goes while others wait for"
                     " verification, so it cannot wait itself")
        if default_upstream not in upstreams and default_upstream not in global_confs:
            self.err(
                rsrc, ("default_upstream",), f"default_upstream '{default_upstream}' is not defined"
            )

        built_orgs: dict[str, Org] = {}
        domain_index: dict[str, str] = {}
        account_index: dict[str, str] = {}
        org_where: dict[str, str] = {}
        for oc, src in orgs:
            if oc.org in built_orgs:
                self.err(
                    src,
                    ("org",),
                    f"organisation '{oc.org}' is already defined in {org_where[oc.org]}",
                )
                continue
            org_where[oc.org] = f"{src.file}:{src.line_of(('org',))}"

            def scoped(name: str, path: YPath, oc: OrgConf = oc, src: Located = src) -> str | None:
                if name in oc.upstreams:
                    return f"{oc.org}/{name}"
                if name in global_confs:
                    return name
                self.err(
                    src,
                    path,
                    f"upstream '{name}' is not defined (neither in this"
                    " organisation's upstreams nor globally)",
                )
                return None

            for name, conf in oc.upstreams.items():
                u = self.upstream(
                    f"{oc.org}/{name}",
                    conf,
                    src,
                    ("upstreams", name),
                    pools,
                    relay.default_pool,
                    base_dir,
                )
                if u:
                    upstreams[u.id] = self.previous(
                        u, oc, global_confs, src, ("upstreams", name)
                    )
            if oc.pool and oc.pool not in pools:
                self.err(src, ("pool",), f"egress pool '{oc.pool}' is not defined")
            for i, d in enumerate(oc.domains):
                owner = domain_index.get(d)
                if owner and owner != oc.org:
                    self.err(
                        src,
                        ("domains", i),
                        f"domain '{d}' is already claimed by"
                        f" organisation '{owner}' ({org_where[owner]})",
                    )
                domain_index.setdefault(d, oc.org)
            org_up = scoped(oc.upstream, ("upstream",)) if oc.upstream else None
            if oc.enforce and not oc.upstream:
                self.err(src, ("enforce",), "enforce: true needs the organisation's upstream")
            members: dict[str, Member] = {}
            for addr, mc in oc.members.items():
                key = addr.lower()
                owner = account_index.get(key)
                if owner and owner != oc.org:
                    self.err(
                        src,
                        ("members", addr),
                        f"account '{addr}' is already a member of organisation '{owner}'",
                    )
                account_index.setdefault(key, oc.org)
                if key in members:  # the same address twice, differing only in case
                    self.err(src, ("members", addr), f"account '{addr}' is listed twice")
                up = scoped(mc.upstream, ("members", addr, "upstream")) if mc.upstream else None
                members[key] = Member(key, up, mc.limits)
            built_orgs[oc.org] = Org(
                id=oc.org,
                name=oc.name or oc.org,
                file=src.file,
                domains=tuple(oc.domains),
                upstream=org_up,
                enforce=oc.enforce,
                pool=oc.pool,
                members=members,
                limits=oc.limits,
                dkim_selectors=tuple(oc.dkim_selectors),
                webhooks=dict(oc.webhooks),
                dsn=oc.dsn,
                dsn_upstream=(
                    scoped(oc.dsn.upstream, ("dsn", "upstream")) if oc.dsn.upstream else None
                ),
                suppression=oc.suppression,
                **self.failover(oc, src, scoped, upstreams),
            )
            check_org_notify(self, oc, src, relay, base_dir)
        dsn_upstream = check_relay_notify(self, relay, rsrc, global_confs, base_dir)
        self.warnings += unresolved_warnings(
            self.unresolved, first_uses(relay, rsrc, orgs, default_upstream)
        )
        if self.errors:
            return None
        return Config(
            file=rsrc.file,
            base_dir=base_dir,
            relay=relay,
            sources=sources,
            pools=pools,
            upstreams=upstreams,
            default_upstream=default_upstream,
            orgs=built_orgs,
            domain_index=domain_index,
            account_index=account_index,
            username_refs=self.username_refs,
            dsn_upstream=dsn_upstream or default_upstream,
            warnings=[str(w) for w in sorted(set(self.warnings), key=lambda e: (e.file, e.line))],
        )
