"""RFC 3461 parameters on MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT), parsed off the ESMTP
parameter dict of relay/smtp/addresses.py (pure). A malformed one is 501 5.5.4 (RFC 3461
§ 4: the server must refuse a value it does not understand rather than ignore it)."""

from __future__ import annotations

import re

from relay.core.dsn import MAX_ENVID, NOTIFY_WORDS, RcptDsn, xtext_valid
from relay.smtp.addresses import AddressSyntaxError

_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
MAX_ORCPT = 500  # RFC 3461 § 4.2: the address at most 500 characters


def mail_dsn(params: dict[str, str | None]) -> tuple[str | None, str | None]:
    """(RET, ENVID), each None when not given; both are removed from `params`."""
    ret = envid = None
    if "RET" in params:
        value = (params.pop("RET") or "").upper()
        if value not in ("FULL", "HDRS"):
            raise AddressSyntaxError("RET takes FULL or HDRS")
        ret = value
    if "ENVID" in params:
        value = params.pop("ENVID") or ""
        if not value or len(value) > MAX_ENVID or not xtext_valid(value):
            raise AddressSyntaxError("ENVID takes an xtext of at most 100 characters")
        envid = value
    return ret, envid


def rcpt_dsn(params: dict[str, str | None]) -> RcptDsn | None:
    """NOTIFY and ORCPT of one recipient, or None when neither was given; removed from
    `params`."""
    if "NOTIFY" not in params and "ORCPT" not in params:
        return None
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    if "NOTIFY" in params:
        words = [w.upper() for w in (params.pop("NOTIFY") or "").split(",")]
        if words == ["NEVER"]:
            notify = ("NEVER",)
        elif words and len(set(words)) == len(words) and all(w in NOTIFY_WORDS for w in words):
            notify = tuple(words)
        else:
            raise AddressSyntaxError("NOTIFY takes NEVER, or SUCCESS, FAILURE and DELAY")
    if "ORCPT" in params:
        value = params.pop("ORCPT") or ""
        kind, semi, address = value.partition(";")
        if (
            not semi
            or not _ADDR_TYPE.fullmatch(kind)
            or not address
            or len(address) > MAX_ORCPT
            or not xtext_valid(address)
        ):
            raise AddressSyntaxError("ORCPT takes addr-type;xtext")
        orcpt = value
    return RcptDsn(notify, orcpt)
