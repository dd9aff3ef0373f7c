"""Policy: every attribution path and routing rule, with the rule text, and routing is total."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config.build import Builder
from relay.config.model import Config
from relay.config.schema import OrgConf, RelayConf
from relay.config.yamlsrc import Located
from relay.policy import applicable_limits, attribute, route

ENV = {"SENDGRID_API_KEY": "a", "MAILJET_API_KEY": "b", "MAILJET_SECRET_KEY": "c", "PW": "d"}
SOURCES = {
    "us-1": {"address": "127.0.0.2", "ehlo": "us-1.relay.example.net"},
    "eu-1": {"address": "127.0.0.4", "ehlo": "eu-1.relay.example.net"},
    "cust-1": {"address": "127.0.0.5", "ehlo": "cust-1.relay.example.net"},
}
POOLS = {"us": ["us-1"], "eu": ["eu-1"], "customer": ["cust-1"]}


def make_config(relay: dict[str, Any], *orgs: dict[str, Any]) -> Config:
    """Build a Config in memory through the same schema and builder that load_config uses."""
    relay = {"egress_sources": SOURCES, "egress_pools": POOLS, "default_pool": "us", **relay}
    builder = Builder(ENV)
    config = builder.build(
        RelayConf.model_validate(relay),
        Located("relay.yaml", relay),
        [(OrgConf.model_validate(o), Located(f"policies/{o['org']}.yaml", o)) for o in orgs],
        Path("/nonexistent"),
    )
    assert builder.errors == []
    assert config is not None
    return config


def own(host: str, pool: str | None = None) -> dict[str, Any]:
    up: dict[str, Any] = {"host": host, "port": 587, "tls": "starttls", "password": "env:PW"}
    return up if pool is None else {**up, "pool": pool}


@pytest.fixture(scope="module")
def config() -> Config:
    return make_config(
        {"upstreams": {"mailjet": {"pool": "eu"}}},
        {
            "org": "acme",
            "domains": ["acme.example"],
            "upstream": "sendgrid",
            "limits": {"per_minute": 600, "per_day": 200000},
        },
        {
            "org": "euro",
            "domains": ["euro.example", "mail.euro.example"],
            "upstream": "mailjet",
            "enforce": True,
            "members": {
                "anna@euro.example": {"upstream": "sendgrid"},
                "jonas@euro.example": {"upstream": "mailjet"},
                "lena@euro.example": {},
            },
        },
        {
            "org": "globex",
            "domains": ["globex.example"],
            "upstream": "sendgrid",
            "members": {
                "Marie@Globex.example": {"upstream": "mailjet"},
                "raj@globex.example": {"upstream": "office", "limits": {"per_hour": 500}},
                "tom@globex.example": {},
                "guest@elsewhere.example": {"upstream": "mailjet"},
            },
            "upstreams": {"office": own("mail.office.globex.example")},
        },
        {
            "org": "contoso",
            "domains": ["contoso.example"],
            "upstream": "smtp",
            "pool": "customer",
            "upstreams": {"smtp": {**own("smtp.contoso.example"), "port": 465, "tls": "implicit"}},
        },
        {"org": "bare", "domains": ["bare.example"]},
        {"org": "corp", "domains": ["corp"]},
    )


# -- attribution ---------------------------------------------------------------------------


def test_tag_header_names_the_organisation(config: Config) -> None:
    att = attribute(config, "x@globex.example", tag_org="acme")
    assert (att.org, att.account, att.rule) == (
        "acme",
        "x@globex.example",
        "tag header X-Relay-Org",
    )


def test_tag_headers_name_organisation_and_account(config: Config) -> None:
    att = attribute(
        config, "bounce@platform.example", tag_org="euro", tag_account="Anna@Euro.example"
    )
    assert (att.org, att.account, att.rule) == (
        "euro",
        "anna@euro.example",
        "tag header X-Relay-Org",
    )


def test_account_tag_alone_finds_its_organisation(config: Config) -> None:
    member = attribute(config, "bounce@platform.example", tag_account="raj@globex.example")
    assert (member.org, member.account, member.rule) == (
        "globex",
        "raj@globex.example",
        "tag header X-Relay-Account",
    )
    by_domain = attribute(config, "", tag_account="someone@acme.example")
    assert (by_domain.org, by_domain.account, by_domain.rule) == (
        "acme",
        "someone@acme.example",
        "tag header X-Relay-Account",
    )


def test_unknown_org_tag_is_ignored_and_noted(config: Config) -> None:
    att = attribute(config, "tom@globex.example", tag_org="initech")
    assert (att.org, att.account) == ("globex", "tom@globex.example")
    assert att.rule == (
        "sender tom@globex.example is a member of globex"
        " (tag X-Relay-Org: 'initech' names no organisation)"
    )
    unknown = attribute(config, "x@nowhere.example", tag_org="initech")
    assert unknown.org == "default"
    assert unknown.rule == (
        "no organisation matched: default (tag X-Relay-Org: 'initech' names no organisation)"
    )


def test_sender_as_account_wins_over_its_domain(config: Config) -> None:
    # guest@elsewhere.example is a globex member whatever domain it is in.
    att = attribute(config, "guest@elsewhere.example")
    assert (att.org, att.rule) == ("globex", "sender guest@elsewhere.example is a member of globex")


def test_sender_domain_and_parent_domain(config: Config) -> None:
    att = attribute(config, "Someone@ACME.example")
    assert (att.org, att.account, att.rule) == (
        "acme",
        "someone@acme.example",
        "sender domain acme.example belongs to acme",
    )
    sub = attribute(config, "news@deep.mail.euro.example")
    assert (sub.org, sub.rule) == ("euro", "sender domain deep.mail.euro.example belongs to euro")
    one_label = attribute(config, "it@corp")
    assert (one_label.org, one_label.rule) == ("corp", "sender domain corp belongs to corp")


def test_member_address_matching_ignores_case(config: Config) -> None:
    att = attribute(config, "MARIE@globex.EXAMPLE")
    assert (att.org, att.account) == ("globex", "marie@globex.example")
    assert att.rule == "sender marie@globex.example is a member of globex"


def test_nothing_matches_gives_the_default(config: Config) -> None:
    for sender, account in [
        ("x@unknown.example", "x@unknown.example"),
        ("", "<>"),
        ("no-at-sign", "no-at-sign"),
        ("x@example", "x@example"),
    ]:
        att = attribute(config, sender)
        assert (att.org, att.account, att.rule) == (
            "default",
            account,
            "no organisation matched: default",
        )


def test_header_names_and_default_org_come_from_the_config() -> None:
    cfg = make_config(
        {
            "attribution": {
                "org_header": "X-Tenant",
                "account_header": "X-User",
                "default_org": "house",
            }
        },
        {"org": "house", "upstream": "mailjet"},
        {"org": "acme", "domains": ["acme.example"]},
    )
    assert attribute(cfg, "a@b.example", tag_org="acme").rule == "tag header X-Tenant"
    assert attribute(cfg, "", tag_account="x@acme.example").rule == "tag header X-User"
    fallback = attribute(cfg, "a@b.example", tag_org="nope")
    assert (
        fallback.rule
        == "no organisation matched: default (tag X-Tenant: 'nope' names no organisation)"
    )
    r = route(cfg, fallback)
    assert (r.upstream.id, r.rule) == ("mailjet", "default upstream of organisation house")


# -- routing -------------------------------------------------------------------------------


def test_enforced_upstream_overrides_a_personal_choice(config: Config) -> None:
    r = route(config, attribute(config, "anna@euro.example"))
    assert (r.upstream.id, r.pool.name) == ("mailjet", "eu")
    assert r.rule == (
        "organisation euro enforces its upstream"
        " (overrides anna@euro.example's personal choice sendgrid)"
    )


def test_enforced_upstream_without_a_conflicting_choice(config: Config) -> None:
    for sender in ("jonas@euro.example", "lena@euro.example", "someone@euro.example"):
        r = route(config, attribute(config, sender))
        assert (r.upstream.id, r.rule) == ("mailjet", "organisation euro enforces its upstream")


def test_personal_choice_of_a_global_upstream(config: Config) -> None:
    r = route(config, attribute(config, "marie@globex.example"))
    assert (r.upstream.id, r.pool.name) == ("mailjet", "eu")
    assert r.rule == "personal choice of account marie@globex.example"


def test_personal_choice_of_the_organisations_own_upstream(config: Config) -> None:
    r = route(config, attribute(config, "raj@globex.example"))
    assert (r.upstream.id, r.upstream.host, r.pool.name) == (
        "globex/office",
        "mail.office.globex.example",
        "us",
    )
    assert r.rule == "personal choice of account raj@globex.example"


def test_organisation_default(config: Config) -> None:
    for sender in ("tom@globex.example", "someone@globex.example"):
        r = route(config, attribute(config, sender))
        assert (r.upstream.id, r.rule) == ("sendgrid", "default upstream of organisation globex")


def test_organisation_pool_overrides_the_upstream_pool(config: Config) -> None:
    r = route(config, attribute(config, "x@contoso.example"))
    assert (r.upstream.id, r.upstream.port, r.upstream.tls.value) == (
        "contoso/smtp",
        465,
        "implicit",
    )
    assert r.upstream.pool == "us"  # the upstream's own (default) pool …
    assert [s.address for s in r.pool.sources] == ["127.0.0.5"]  # … but contoso's wins
    assert r.rule == "default upstream of organisation contoso"


def test_global_default(config: Config) -> None:
    for sender, tag in [("x@bare.example", None), ("x@nowhere.example", None), ("", "initech")]:
        r = route(config, attribute(config, sender, tag_org=tag))
        assert (r.upstream.id, r.pool.name, r.rule) == ("sendgrid", "us", "global default upstream")


def test_global_default_upstream_is_configurable() -> None:
    cfg = make_config(
        {"default_upstream": "relay2", "upstreams": {"relay2": own("r2.example", "eu")}}
    )
    r = route(cfg, attribute(cfg, "x@y.example"))
    assert (r.upstream.id, r.pool.name, r.rule) == ("relay2", "eu", "global default upstream")


def test_tagged_account_picks_the_personal_choice_within_the_tagged_org(config: Config) -> None:
    att = attribute(
        config, "bounce@platform.example", tag_org="globex", tag_account="raj@globex.example"
    )
    assert route(config, att).upstream.id == "globex/office"


# -- limits --------------------------------------------------------------------------------


def test_applicable_limits_merge_defaults_org_and_member() -> None:
    cfg = make_config(
        {
            "limits": {
                "client": {"per_minute": 100},
                "organisation": {"per_hour": 1000},
                "account": {"per_day": 50},
                "sender": {"recipients_per_message": 10},
            }
        },
        {
            "org": "globex",
            "domains": ["globex.example"],
            "limits": {"per_minute": 600},
            "members": {"raj@globex.example": {"limits": {"per_hour": 500}}},
        },
    )
    att = attribute(cfg, "Raj@globex.example")
    lims = applicable_limits(cfg, att, "Raj@globex.example", "127.0.0.9")
    assert [(x.scope, x.key, x.describe()) for x in lims] == [
        ("client", "127.0.0.9", "/min 100"),
        ("organisation", "globex", "/min 600, /hour 1000"),
        ("account", "raj@globex.example", "/hour 500, /day 50"),
        ("sender", "raj@globex.example", "rcpt/msg 10"),
    ]
    other = applicable_limits(cfg, attribute(cfg, ""), "", "127.0.0.1")
    assert [(x.scope, x.key, x.describe()) for x in other] == [
        ("client", "127.0.0.1", "/min 100"),
        ("organisation", "default", "/hour 1000"),
        ("account", "<>", "/day 50"),
        ("sender", "<>", "rcpt/msg 10"),
    ]


# -- routing is total ----------------------------------------------------------------------

ORG_IDS = ["acme", "euro", "globex", "contoso", "initech", "default"]
DOMAINS = ["a.example", "b.example", "sub.a.example", "c.test", "corp", "d.example"]
GLOBAL = ["sendgrid", "mailjet", "relay2"]
POOL_NAMES = [None, "us", "eu", "customer"]


@st.composite
def configs(draw: st.DrawFn) -> Config:
    org_ids = draw(st.lists(st.sampled_from(ORG_IDS), unique=True, max_size=5))
    # Each domain and each member address belongs to at most one organisation.
    domain_owner = {d: draw(st.sampled_from([None, *org_ids])) for d in DOMAINS}
    addresses = [f"{u}@{d}" for u in ("ann", "Bob", "c.d") for d in DOMAINS[:3]]
    member_owner = {a: draw(st.sampled_from([None, *org_ids])) for a in addresses}
    orgs = []
    for oid in org_ids:
        own_names = draw(st.lists(st.sampled_from(["own", "backup"]), unique=True))
        choices = [*GLOBAL, *own_names]
        upstream = draw(st.sampled_from([None, *choices]))
        org: dict[str, Any] = {
            "org": oid,
            "domains": [d for d, o in domain_owner.items() if o == oid],
            "upstream": upstream,
            "enforce": upstream is not None and draw(st.booleans()),
            "pool": draw(st.sampled_from(POOL_NAMES)),
            "upstreams": {
                n: own(f"{n}.{oid}.example", draw(st.sampled_from(POOL_NAMES))) for n in own_names
            },
            "members": {
                a: {"upstream": draw(st.sampled_from([None, *choices]))}
                for a, o in member_owner.items()
                if o == oid
            },
        }
        orgs.append(org)
    relay = {
        "default_upstream": draw(st.sampled_from(GLOBAL)),
        "default_pool": draw(st.sampled_from(["us", "eu", "customer"])),
        "upstreams": {
            "relay2": own("relay2.example", draw(st.sampled_from(POOL_NAMES))),
            "mailjet": {"pool": draw(st.sampled_from(POOL_NAMES))},
        },
        "attribution": {"default_org": draw(st.sampled_from(["default", "acme", "nobody"]))},
    }
    return make_config(relay, *orgs)


def weird_case(s: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(s), max_size=len(s)).map(
        lambda ups: "".join(c.upper() if u else c for c, u in zip(s, ups, strict=True))
    )


known = st.sampled_from(
    [f"{u}@{d}" for u in ("ann", "bob", "c.d", "x") for d in DOMAINS]
    + [f"x@deep.{d}" for d in DOMAINS]
)
senders = st.one_of(
    st.just(""),
    known.flatmap(weird_case),
    known.map(lambda a: f" {a} "),
    st.text(max_size=30),
    st.emails().map(str),
)
tags = st.one_of(st.none(), st.sampled_from([*ORG_IDS, "", " acme ", "ACME"]), st.text(max_size=10))


def expected_org(config: Config, sender: str, tag_org: str | None, tag_account: str | None) -> str:
    """The attribution order of docs/architecture.md, written out independently of relay.policy."""
    if tag_org and tag_org.strip() in config.orgs:
        return tag_org.strip()
    for address in (tag_account or "", sender):
        address = address.strip().lower()
        if not address:
            continue
        if address in config.account_index:
            return config.account_index[address]
        domain = address.rpartition("@")[2].rstrip(".")
        claims = [d for d in config.domain_index if domain == d or domain.endswith("." + d)]
        if claims:
            return config.domain_index[max(claims, key=len)]  # the nearest parent
    return config.relay.attribution.default_org


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), sender=senders, tag_org=tags, tag_account=st.one_of(tags, senders))
def test_routing_is_total(
    config: Config, sender: str, tag_org: str | None, tag_account: str | None
) -> None:
    att = attribute(config, sender, tag_org=tag_org, tag_account=tag_account)
    r = route(config, att)
    assert att.org == expected_org(config, sender, tag_org, tag_account)
    assert config.upstreams[r.upstream.id] is r.upstream
    assert config.pools[r.pool.name] is r.pool
    assert r.pool.sources
    assert att.org in config.orgs or att.org == config.relay.attribution.default_org
    assert att.account == att.account.lower() and att.account
    assert att.rule and r.rule
    org = config.orgs.get(att.org)
    if org is not None and org.enforce:
        assert r.upstream.id == org.upstream
        assert r.rule.startswith(f"organisation {org.id} enforces its upstream")
    if org is not None and org.pool:
        assert r.pool.name == org.pool
    else:
        assert r.pool.name == r.upstream.pool
    if org is None:
        assert (r.upstream.id, r.rule) == (config.default_upstream, "global default upstream")
    assert len(applicable_limits(config, att, sender, "127.0.0.1")) == 4
