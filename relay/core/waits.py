"""Why a queued message waits: one vocabulary for the gate, the scheduler and the operator views.

A `Wait` is what a throttle, a pause or the queue itself answers when mail may not go now:
how long, a `kind` (a short stable name: the metric's label and the API's key) and a text
for people that names the limit and when it opens, e.g.

    waiting for quota hourly 10/10 on contoso/contoso-smtp, window opens 14:05:00Z
    upstream paused until 14:05:00Z (slow-down after: 421 4.7.0 try later)

A new reason is one more `kind` here and the place that raises it (e.g. a credential-failure
pause: `Wait(seconds, CREDENTIALS, f"upstream paused: credentials failing: {reply}")`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Kinds, in the order the queue summary lists them.
QUOTA = "quota"  # an upstream quota is used up until its window opens
CONNECTIONS = "connections"  # every connection the upstream allows is in use
INTERVAL = "interval"  # the upstream's min_interval since the last start
SLOW_DOWN = "slow_down"  # the upstream said "slow down" or did not answer: paused
CREDENTIALS = "credentials"  # the upstream refuses our credentials: paused until fixed
CONFIGURATION = "configuration"  # the account's or tenant's configuration: paused until fixed
SENDING_LIMIT = "sending_limit"  # a provider's daily sending limit: paused until it resets
UNAVAILABLE = "unavailable"  # the upstream cannot be used as configured (missing secret)
LIMITS_BACKEND = "limits_backend"  # the shared limits backend is unreachable (tempfail)
RETRY = "retry"  # deferred by the upstream: next attempt at a set time
HELD = "held"  # held by the operator
READY = "ready"  # in line for the next free delivery
DELIVERING = "delivering"  # an attempt is in progress
SPOOLED = "spooled"  # in the spool only, loaded when memory has room (spool.active_messages)
KINDS = (QUOTA, CONNECTIONS, INTERVAL, SLOW_DOWN, CREDENTIALS, CONFIGURATION, SENDING_LIMIT,
         UNAVAILABLE, LIMITS_BACKEND, RETRY, HELD, READY, DELIVERING, SPOOLED)
# A pause for a person (relay/scheduler/health.py), by the class of the reply that caused it.
PAUSE_KINDS = {"auth": CREDENTIALS, "policy": CONFIGURATION, "rate": SENDING_LIMIT}


@dataclass(frozen=True, slots=True)
class Wait:
    seconds: float  # from now
    kind: str
    reason: str  # for people: names the limit and when it opens
    # True: the upstream's whole ready queue waits (a quota, a pause); False: only this
    # delivery (every connection is busy: the deliveries holding them go on with the queue).
    whole_queue: bool = True


def clock_time(t: float) -> str:
    """A wall-clock time as operators read it in UTC: 14:05:00Z (with the date if not today)."""
    st = time.gmtime(t)
    if time.gmtime()[:3] == st[:3]:
        return time.strftime("%H:%M:%SZ", st)
    return time.strftime("%Y-%m-%d %H:%M:%SZ", st)
