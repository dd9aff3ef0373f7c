"""The verified switch-over (`relay verify-upstream`, `POST /upstreams/{name}/verify`).

A `verify: true` upstream carries no mail until a person proved it works: a test message
with a one-time code goes through it, from the egress source it would use, to an address
the customer reads; the code typed back (or the link in the platform's UI calling the API)
activates it. Meanwhile its organisation's mail goes the way it went before (routing's
`previous` or the next rule). The state is durable and tied to the upstream's settings
(relay/spool/verification.py). A failure returns the server's original reply, step by step.
"""

from __future__ import annotations

import logging
from typing import Any

from relay.config.model import Config
from relay.core.model import Upstream
from relay.delivery.resolver import Resolver
from relay.oauth import TokenBroker
from relay.ops.probe import TargetError, configured_upstream, probe, sources_for
from relay.spool.verification import Outcome, VerificationStore

log = logging.getLogger("relay.verify")

SUBJECT = "Confirm your mail settings: code {code}"
TEXT = """This message was sent through your mail server ({host}) by the relay that will
carry your organisation's mail from now on, to confirm the new settings work.

Your confirmation code: {code}

Enter it where you changed your mail settings. Until then your mail keeps going the way
it went before. If you did not change any settings, ignore this message.

(upstream {upstream}, sent from {source})
"""


def verifiable(config: Config, name: str) -> Upstream:
    u = configured_upstream(config, name)
    if not u.verify:
        raise TargetError(f"upstream '{name}' does not have verify: true; it carries mail already")
    return u


async def send_code(
    config: Config,
    store: VerificationStore,
    name: str,
    send_to: str,
    resolver: Resolver,
    *,
    tokens: TokenBroker | None = None,
    timeout: float = 15.0,  # noqa: ASYNC109 - per step
) -> dict[str, Any]:
    """Send a new one-time code through upstream `name`; the report says every step (never
    the code)."""
    u = verifiable(config, name)
    if "@" not in send_to or any(c in send_to for c in " \r\n<>"):
        raise TargetError(f"'{send_to}' is not an email address")
    source = sources_for(config, u)[0]
    code = store.begin(u, send_to)
    report = await probe(
        u, source, resolver, send_to=send_to, timeout=timeout, tokens=tokens,
        message=(SUBJECT.format(code=code),
                 TEXT.format(code=code, host=u.host, upstream=u.id, source=source.address)),
    )
    if not report.ok:
        store.cancel(u)
    log.info("verify-upstream %s: code %s to %s", u.id, "sent" if report.ok else "NOT sent",
             send_to)
    return {"upstream": u.id, "sent": report.ok, "send_to": send_to, "report": report.as_dict()}


def confirm(config: Config, store: VerificationStore, name: str, code: str) -> Outcome:
    u = verifiable(config, name)
    out = store.confirm(u, code)
    log.info("verify-upstream %s: %s", u.id, out.text)
    return out
