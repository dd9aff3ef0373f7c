"""Failover as policy (relay/policy/failover.py, pure) and upstream health
(relay/scheduler/health.py): when an organisation's mail may leave its upstream, where to,
and when it may not (its own server, its region)."""

from __future__ import annotations

from relay.config.model import Config
from relay.core.model import Outcome, RecipientResult, Reply
from relay.policy import Attribution, route
from relay.policy.failover import Unusable, chain, fail_over
from relay.scheduler.unusable import UnusableSince
from tests.test_policy import make_config, own


def cfg() -> Config:
    return make_config(
        {"upstreams": {"mailjet": {"pool": "eu"}, "eu-backup": {**own("b.eu.example"),
                                                                "region": "eu"}}},
        {"org": "acme", "domains": ["acme.example"], "upstream": "sendgrid",
         "failover": ["mailjet"], "failover_after": "10m", "failover_after_deferrals": 3},
        {"org": "euro", "domains": ["euro.example"], "upstream": "mailjet", "region": "eu",
         "failover": ["sendgrid", "eu-backup"], "failover_after": "1m"},
        {"org": "cust", "domains": ["cust.example"], "upstream": "own",
         "upstreams": {"own": own("smtp.cust.example")}, "failover": ["sendgrid"]},
        {"org": "plain", "domains": ["plain.example"], "upstream": "sendgrid"},
    )


def routed(config: Config, org: str, unusable: dict[str, Unusable], deferrals: int = 0,
           now: float = 10_000.0) -> tuple[str, str]:
    r, why = fail_over(config, route(config, Attribution(org, f"a@{org}.example", "t")),
                       unusable=unusable, deferrals=deferrals, now=now)
    return r.upstream.id, why


def test_failover_after_the_time_or_the_deferrals_and_only_for_orgs_that_ask() -> None:
    c = cfg()
    down = {"sendgrid": Unusable(10_000.0 - 599, "not answering")}
    assert routed(c, "acme", down) == ("sendgrid", "")  # not yet 10 minutes
    assert routed(c, "acme", down, now=10_001.0) == (
        "mailjet", "failover to mailjet: sendgrid unusable for 10 min (not answering)")
    assert routed(c, "acme", {}, deferrals=3)[0] == "mailjet"
    assert routed(c, "acme", {}, deferrals=2)[0] == "sendgrid"
    assert routed(c, "plain", down, now=99_999.0)[0] == "sendgrid"  # off by default
    # The failover upstream unusable too: stay (the mail waits where it belongs).
    both = {**down, "mailjet": Unusable(0.0, "not answering")}
    assert routed(c, "acme", both, now=10_001.0) == ("sendgrid", "")


def test_a_region_bound_org_fails_over_only_inside_its_region() -> None:
    c = cfg()
    steps = chain(c, c.orgs["euro"], c.upstreams["mailjet"])
    assert [(s.upstream, s.allowed) for s in steps] == [("sendgrid", False), ("eu-backup", True)]
    assert "region us is outside the organisation's region eu" in steps[0].note
    assert routed(c, "euro", {"mailjet": Unusable(0.0, "x")})[0] == "eu-backup"


def test_never_away_from_an_orgs_own_server_unless_it_allows_it() -> None:
    c = cfg()
    assert routed(c, "cust", {"cust/own": Unusable(0.0, "x")})[0] == "cust/own"
    allowed = make_config({}, {"org": "cust", "domains": ["cust.example"], "upstream": "own",
                               "upstreams": {"own": own("smtp.cust.example")},
                               "failover": ["sendgrid"], "failover_from_own_servers": True})
    assert routed(allowed, "cust", {"cust/own": Unusable(0.0, "x")})[0] == "sendgrid"


def test_health_starts_at_the_first_upstream_fault_and_ends_at_a_delivery() -> None:
    h = UnusableSince()
    refused = RecipientResult("r@x", Outcome.DEFERRED, Reply(451, "4.4.1 no answer", "4.4.1"))
    full = RecipientResult("r@x", Outcome.DEFERRED, Reply(452, "4.2.2 mailbox full", "4.2.2"))
    ok = RecipientResult("r@x", Outcome.DELIVERED, Reply(250, "ok"))
    h.note("up", [full], 1.0)
    assert "up" not in h.unusable  # the recipient's trouble, not the upstream's
    h.note("up", [refused], 2.0)
    h.note("up", [refused], 5.0)
    assert h.unusable["up"] == Unusable(2.0, "not answering")
    h.note("up", [ok], 6.0)
    assert "up" not in h.unusable
