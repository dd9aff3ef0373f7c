"""RFC 3461 DSN parameters of one message: RET and ENVID (MAIL), NOTIFY and ORCPT (RCPT).

The listener accepts them (relay/smtp/dsnparams.py parses them), the spool keeps them
(`encode`/`decode`, one JSON text per message), the delivery passes them on to an upstream
that offers DSN, and the bounce stage honours NOTIFY for the relay's own DSNs. ENVID and
ORCPT are kept as received (xtext, RFC 3461 § 4); `xtext_decode` gives their text for a DSN.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# RFC 3461 § 4: xtext = *( xchar / hexchar ); xchar is "!" to "~" except "+" and "=",
# hexchar is "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(rb"\+([0-9A-Fa-f]{2})")
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
MAX_ENVID = 100  # RFC 3461 § 4.4: at most 100 characters


def xtext_valid(text: str) -> bool:
    return _XTEXT.fullmatch(text) is not None


def xtext_decode(text: str) -> str:
    """The text an xtext stands for ("+2B" is "+"); undecodable octets become U+FFFD."""
    raw = _HEXCHAR.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return raw.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class RcptDsn:
    """One recipient's NOTIFY (None: not given) and ORCPT (None: not given), as received."""

    notify: tuple[str, ...] | None = None  # ("NEVER",) or a subset of NOTIFY_WORDS
    orcpt: str | None = None  # "rfc822;user+40example.com" (addr-type ";" xtext)


@dataclass(frozen=True, slots=True)
class DsnParams:
    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None  # xtext
    rcpts: tuple[tuple[str, RcptDsn], ...] = ()  # recipients that carried NOTIFY or ORCPT

    def __bool__(self) -> bool:
        return bool(self.ret or self.envid or self.rcpts)

    def of(self, rcpt: str) -> RcptDsn:
        for name, params in self.rcpts:
            if name == rcpt:
                return params
        return RcptDsn()

    def notify(self, rcpt: str, event: str) -> bool:
        """Whether `rcpt` wants a DSN for `event` (SUCCESS, FAILURE or DELAY). Without
        NOTIFY the relay decides (RFC 3461 § 4.1): FAILURE yes, SUCCESS and DELAY no (it
        sends no delay notices at all)."""
        words = self.of(rcpt).notify
        if words is None:
            return event == "FAILURE"
        return event in words

    # -- passing them on (RFC 3461 § 4: the same values, verbatim) -------------------------

    def mail_params(self) -> bytes:
        out = b""
        if self.ret:
            out += b" RET=" + self.ret.encode("ascii")
        if self.envid:
            out += b" ENVID=" + self.envid.encode("ascii")
        return out

    def rcpt_params(self, rcpt: str) -> bytes:
        p = self.of(rcpt)
        out = b""
        if p.notify is not None:
            out += b" NOTIFY=" + ",".join(p.notify).encode("ascii")
        if p.orcpt is not None:
            out += b" ORCPT=" + p.orcpt.encode("ascii")
        return out

    # -- the spool's codec -----------------------------------------------------------------

    def encode(self) -> str:
        return json.dumps(
            {
                "ret": self.ret,
                "envid": self.envid,
                "rcpts": [[r, list(p.notify) if p.notify else None, p.orcpt] for r, p in self.rcpts],
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def decode(cls, text: str | None) -> DsnParams:
        """The parameters stored by `encode`; empty ones for None or anything unreadable
        (a damaged value must not stop a delivery: the relay's defaults apply)."""
        if not text:
            return cls()
        try:
            raw = json.loads(text)
            rcpts = tuple(
                (str(r), RcptDsn(tuple(map(str, n)) if n else None, None if o is None else str(o)))
                for r, n, o in raw.get("rcpts", [])
            )
            ret, envid = raw.get("ret"), raw.get("envid")
            return cls(
                ret=ret if ret in ("FULL", "HDRS") else None,
                envid=envid if isinstance(envid, str) and xtext_valid(envid) else None,
                rcpts=rcpts,
            )
        except (ValueError, TypeError, AttributeError):
            return cls()
