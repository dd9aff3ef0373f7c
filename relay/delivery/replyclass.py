"""Why a recipient failed, in one word the platform can act on (pure, table-tested).

`reply_class(reply)` names the kind of failure behind an SMTP reply (ours or the peer's):

    hard     the address does not exist / cannot ever be delivered (5.1.x, other 5xx)
    soft     a temporary failure with no more specific reason (4xx)
    auth     the upstream refused *our* credentials (535, 5.7.8, 530 5.7.0 auth required)
    policy   refused by the receiver's policy (5.7.x / 4.7.x that is not spam or auth)
    spam     refused as spam, for content or reputation
    quota    the mailbox is full / over its storage quota (4.2.2, 5.2.2)
    rate     the upstream asked us to slow down (421, throttling wording)
    dns      a name did not resolve (4.4.3, 5.1.2 bad destination domain)
    network  no connection, a broken connection or a timeout (4.4.1, 4.4.2, 4.4.7)
    tls      TLS handshake, certificate or required STARTTLS missing (4.7.5, 4.7.10, 454)
    expired  still failing when the queue's maximum age was reached (set by the caller)

Only generic rules live here: SMTP codes, RFC 3463 enhanced codes, common wordings.
Provider-specific classifiers (Microsoft 365, Google) can run first and fall back to this.
"""

from __future__ import annotations

import re
from typing import Final

from relay.core.model import Reply
from relay.delivery.outcome import is_throttled

CLASSES: Final = ("hard", "soft", "auth", "policy", "spam", "quota", "rate", "dns",
                  "network", "tls", "expired")

_SPAM = re.compile(
    r"\bspam\b|junk|blocklist|blacklist|block ?list|\brbl\b|spamhaus|reputation|"
    r"content (?:rejected|refused)|message (?:content )?rejected|phish|malware|virus",
    re.IGNORECASE,
)
_QUOTA = re.compile(r"mailbox (?:is )?full|over ?quota|quota exceeded|storage|insufficient "
                    r"system storage|exceeded storage", re.IGNORECASE)
_AUTH = re.compile(r"authentication (?:failed|required|credentials)|auth(?:entication)? "
                   r"(?:unsuccessful|failure)|invalid credentials|bad credentials|"
                   r"username and password not accepted", re.IGNORECASE)
_DNS = re.compile(r"does not resolve|no such domain|domain not found|nxdomain|"
                  r"host not found|servfail|no mx", re.IGNORECASE)
_TLS = re.compile(r"\btls\b|starttls|certificate|ssl", re.IGNORECASE)


def reply_class(reply: Reply) -> str:
    """The class of a failed reply ("" for a 2xx: a delivery has no failure class). The
    rules are tried in order; the first that matches decides."""
    code = reply.code
    if 200 <= code < 300:
        return ""
    parts = (reply.enhanced or "").split(".")
    sd = ".".join(parts[1:]) if len(parts) == 3 else ""  # subject.detail, e.g. "1.1"
    text = reply.text
    if code == 535 or sd in ("7.8", "7.9", "7.11", "7.12") or _AUTH.search(text):
        return "auth"
    if sd in ("7.4", "7.5", "7.10") or (code == 454 and _TLS.search(text)):
        return "tls"
    if sd in ("4.3", "1.2") or _DNS.search(text):
        return "dns"
    if code < 500 and sd in ("4.0", "4.1", "4.2", "4.6", "4.7"):
        return "network"
    if sd == "2.2" or _QUOTA.search(text):
        return "quota"
    if is_throttled(reply):
        return "rate"
    if _SPAM.search(text):
        return "spam"
    if sd.startswith("7."):
        return "policy"
    return "hard" if code >= 500 else "soft"
