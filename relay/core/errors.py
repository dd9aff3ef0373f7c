"""One error hierarchy and one chokepoint that turns any error into an SMTP reply.

Modelled on maddy's exterrors: an error carries the SMTP code, the enhanced status code
(RFC 3463), the text the client may see, and a reason for the log (which may hold detail the
client must not see). Anything that is not a RelayError fails closed as 451 4.3.0: a bug
never looks like a permanent refusal and never leaks a traceback.
"""

from __future__ import annotations


class RelayError(Exception):
    code: int = 451
    enhanced: str = "4.3.0"
    client_text: str = "Temporary local problem, try again later"

    def __init__(
        self,
        client_text: str | None = None,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        reason: str | None = None,
    ) -> None:
        if client_text is not None:
            self.client_text = client_text
        if code is not None:
            self.code = code
        if enhanced is not None:
            self.enhanced = enhanced
        self.reason = reason or self.client_text
        super().__init__(self.reason)

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def reply(self, queue_id: str | None = None) -> str:
        """The reply line for the client, e.g. '451 4.3.0 Temporary local problem'."""
        text = self.client_text.replace("\r", " ").replace("\n", " ")
        if queue_id:
            text = f"{text} [{queue_id}]"
        return f"{self.code} {self.enhanced} {text}"


class TemporaryError(RelayError):
    code = 451
    enhanced = "4.3.0"


class PermanentError(RelayError):
    code = 554
    enhanced = "5.7.1"
    client_text = "Rejected"


class SpoolError(TemporaryError):
    """The spool could not make the message durable: answer 451 4.3.0, keep nothing."""

    client_text = "Queue write failed, try again later"


class PolicyError(TemporaryError):
    """Policy crashed or timed out: fail closed (Postfix practice), 451 4.3.5."""

    enhanced = "4.3.5"
    client_text = "Policy temporarily unavailable, try again later"


class RateLimited(TemporaryError):
    code = 451
    enhanced = "4.7.1"
    client_text = "Rate limit reached, try again later"


class AccessDenied(PermanentError):
    code = 554
    enhanced = "5.7.1"
    client_text = "Relay access denied"


# The address errors of relay/smtp/addresses.py live here: that module is compiled in the
# compiled build, and mypyc drops a compiled subclass's class-level values (docs/architecture.md).
class AddressError(PermanentError):
    """A well-formed argument naming a mailbox the relay will not accept."""

    code = 553
    enhanced = "5.1.3"
    client_text = "Bad destination mailbox address syntax"


class AddressSyntaxError(AddressError):
    """The MAIL/RCPT argument is not even syntactically an SMTP path."""

    code = 501
    enhanced = "5.5.4"
    client_text = "Syntax error in parameters or arguments"


def to_reply(exc: BaseException, queue_id: str | None = None) -> str:
    """The single chokepoint: any exception → one SMTP reply line. Unknown errors fail closed."""
    if isinstance(exc, RelayError):
        return exc.reply(queue_id)
    return TemporaryError().reply(queue_id)
