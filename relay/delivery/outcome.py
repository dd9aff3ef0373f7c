"""Pure classification of SMTP replies into delivery outcomes (no I/O, table-tested).

Everything the delivery client decides about a reply lives here: how a raw
(code, message) pair becomes a `Reply`, which `Outcome` a reply means, whether it asks us
to slow down, which MAIL parameters a message needs, and the texts we synthesise when
there is no reply at all (refused connection, timeout, TLS failure).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from relay.core.model import Outcome, Reply
from relay.core.redact import redact

# RFC 3463 § 2: class.subject.detail; the class must agree with the reply code's first
# digit (RFC 2034 § 4), otherwise the token is just text.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")

# Wording that servers use when they want fewer or slower messages.
# "Too many recipients" (452 4.5.3) is about one message, so only connections, messages
# and the like count.
_RATE_WORDING = re.compile(
    r"rate[- ]?limit|\brate\b|too many (?:connections|messages|mails|e-?mails|requests|sessions)"
    r"|too fast|slow(?:ing)? down|throttl|quota|limit exceeded|exceeded .*limit",
    re.IGNORECASE,
)


def parse_reply(code: int, message: str) -> Reply:
    """Turn aiosmtplib's (code, message) into a Reply, keeping the peer's words verbatim
    except for known secret values (relay.core.redact).

    A multi-line reply arrives with its lines joined by newlines; we join them with a
    space so that a Reply is always one line (safe for the mail log and for a DSN's
    Diagnostic-Code), without changing any word of it.
    """
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    # Redacted here, where upstream text becomes a Reply: a server that quotes our password
    # back (or its AUTH base64) must not put it in the log, the spool, a DSN or the API.
    text = redact(text)
    return Reply(code, text, enhanced_code(code, text))


def enhanced_code(code: int, text: str) -> str | None:
    """The RFC 3463 enhanced status code at the start of `text`, if it matches `code`."""
    match = _ENHANCED.match(text)
    if match is None or match.group(1) != str(code)[0]:
        return None
    return match.group(0)


def classify(reply: Reply) -> Outcome:
    """2xx → delivered, 5xx → bounced, 4xx → deferred.

    Anything else is not a valid final reply (RFC 5321 § 4.2.1: the first digit is 2 to 5;
    a 1xx or 3xx cannot end a command, and a misbehaving server can send " 25" or "999"):
    deferred, failing closed — never counted as a delivery, never bounced.
    """
    if 200 <= reply.code < 300:
        return Outcome.DELIVERED
    if 500 <= reply.code < 600:
        return Outcome.BOUNCED
    return Outcome.DEFERRED


def is_throttled(reply: Reply) -> bool:
    """True when the upstream asks the whole relay to slow down, not just this message.

    - 421: the server is closing the channel (RFC 5321 § 3.8); whatever the reason, more
      connections right now would be refused too.
    - 451 with a 4.7.x enhanced code: the policy class (RFC 3463 § 3.8), which providers
      use for per-sender rate limits.
    - any other 4xx whose text talks about rates, quotas or "too many".
    Permanent replies are never throttling: they are final for the recipient.
    """
    if not 400 <= reply.code < 500:
        return False
    if reply.code == 421:
        return True
    enhanced = reply.enhanced or ""
    if reply.code == 451 and enhanced.startswith("4.7."):
        return True
    return _RATE_WORDING.search(reply.text) is not None


def is_ascii(text: str) -> bool:
    return text.isascii()


def needs_smtputf8(sender: str, recipients: Sequence[str]) -> bool:
    """RFC 6531 § 3.4: non-ASCII in any envelope address requires the SMTPUTF8 parameter."""
    return not is_ascii(sender) or any(not is_ascii(r) for r in recipients)


def needs_8bitmime(data: bytes) -> bool:
    """RFC 6152: a body with any octet ≥ 0x80 is 8-bit and should say BODY=8BITMIME."""
    return not data.isascii()


# Synthesised replies -------------------------------------------------------------------
# When there is no SMTP reply (no connection, a timeout, a TLS failure) we make one up, in
# the same shape as a real one, so the scheduler and the mail log handle every failure
# alike. Codes follow RFC 3463: 4.4.1 no answer from host, 4.4.2 bad connection, 4.4.3
# directory (DNS) failure, 4.7.5 cryptographic failure, 4.7.10 encryption needed.


def synthesised(code: int, enhanced: str, detail: str) -> Reply:
    """A reply we made up; the text starts with the enhanced code like a server's would."""
    detail = redact(detail.replace("\r", " ").replace("\n", " "))  # may quote the server
    return Reply(code, f"{enhanced} {detail}", enhanced)


def no_answer(detail: str) -> Reply:
    """Connection refused, unreachable or timed out before the greeting."""
    return synthesised(451, "4.4.1", detail)


def bad_connection(detail: str) -> Reply:
    """The connection broke, or a command timed out, during the session."""
    return synthesised(451, "4.4.2", detail)


def dns_failure(detail: str) -> Reply:
    return synthesised(451, "4.4.3", detail)


def tls_failure(detail: str) -> Reply:
    """Handshake or certificate verification failed (RFC 3207 § 4.1: the client decides)."""
    return synthesised(454, "4.7.5", detail)


def tls_unavailable(detail: str) -> Reply:
    """STARTTLS is required by our configuration but the server does not offer it."""
    return synthesised(454, "4.7.10", detail)


def utf8_unsupported(detail: str) -> Reply:
    """RFC 6531 § 3.2: a non-ASCII address must not be sent to a server without SMTPUTF8;
    the message cannot be delivered as addressed, so it is permanent (5.6.7 is the code
    RFC 6531 registers for "non-ASCII addresses not permitted")."""
    return synthesised(553, "5.6.7", detail)
