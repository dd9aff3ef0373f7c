"""Pure parsing of SMTP envelope arguments: the path and parameters of MAIL FROM / RCPT TO.

Grammar from RFC 5321 § 4.1.2 (Path, Mailbox, Local-part, Domain, address-literal), with
the RFC 6531 § 3.3 extensions when the client declared SMTPUTF8, and the size limits of
RFC 5321 § 4.5.3.1. On top of the grammar this module refuses what a relay must never pass
on: source routes (`<@a,@b:user@c>`), the `%` hack, bang paths (`a!b`) and `@` hidden in a
quoted local part: downstream servers have interpreted each of them as a routing
instruction, which would turn the relay into an open relay.

Every failure is an `AddressError` (a `PermanentError`, so `relay.errors.to_reply` turns it
into the reply): `AddressSyntaxError` (501 5.5.4) when the command argument itself is
malformed, `AddressError` (553 5.1.3) when it is a well-formed but unacceptable mailbox.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from relay.core.errors import AddressError, AddressSyntaxError

__all__ = [
    "AddressError",
    "AddressSyntaxError",
    "parse_mailbox",
    "parse_params",
    "split_path",
]

# RFC 5321 § 4.5.3.1.1-3: local part 64 octets, domain 255 octets, path 256 octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 § 4.1.2: esmtp-value = 1*(%d33-60 / %d62-126), widened to UTF-8 by RFC 6531.
_ESMTP_VALUE = re.compile(r"[^\x00-\x20=\x7f]+")


# Unicode's Cc category, which is exactly these 65 code points (C0, DEL, C1): one regex
# search instead of a category lookup per character (twice per message, MAIL and RCPT).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _check_chars(s: str) -> None:
    # A surrogate comes from the listener's surrogateescape decoding of invalid UTF-8.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise AddressSyntaxError("Invalid UTF-8 in argument") from None
    # CR, LF and NUL (and any other control) never belong in a command argument: a
    # bare CR here is how a header or command gets smuggled (RFC 5321 § 2.3.8).
    if _CONTROL.search(s) is not None:
        raise AddressSyntaxError("Control character in argument")


def split_path(arg: str) -> tuple[str, str]:
    """Split 'FROM:'-stripped argument text into (path contents, parameter text).

    `<a@b> SIZE=10` gives `("a@b", "SIZE=10")`; `<>` gives `("", "")`. The brackets may be
    missing (`a@b SIZE=10`), which RFC 5321 forbids but widespread clients send. Quoted
    local parts may contain spaces and `>`, so the closing bracket is found by scanning.
    """
    _check_chars(arg)
    s = arg.lstrip(" ")
    if not s:
        raise AddressSyntaxError("Missing path")
    if not s.startswith("<"):
        path, _, rest = s.partition(" ")
        if ">" in path:
            raise AddressSyntaxError("Unbalanced '>' in path")
        return path, rest.strip(" ")
    i = _closing_bracket(s)
    rest = s[i + 1 :]
    if rest and not rest.startswith(" "):
        raise AddressSyntaxError("Expected space after path")
    return s[1:i], rest.strip(" ")


def _closing_bracket(s: str) -> int:
    """Where the `>` closing the path `s` (which starts with `<`) is. Without a quoted local
    part (nearly every path) that is the first `>`, found by `str.find`; otherwise the
    characters are scanned one by one, quoted pairs and all."""
    if '"' not in s:
        close = s.find(">", 1)
        opening = s.find("<", 1)
        if opening != -1 and (close == -1 or opening < close):
            raise AddressSyntaxError("Unexpected '<' in path")
        if close == -1:
            raise AddressSyntaxError("Missing '>' at end of path")
        return close
    return _closing_bracket_scanned(s)


def _closing_bracket_scanned(s: str) -> int:
    i = 1
    quoted = False
    while i < len(s):
        c = s[i]
        if quoted:
            if c == "\\":
                i += 1  # quoted-pairSMTP: the next character is literal
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return i
        elif c == "<":
            raise AddressSyntaxError("Unexpected '<' in path")
        i += 1
    raise AddressSyntaxError("Missing '>' at end of path")


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters (`SIZE=10 BODY=8BITMIME SMTPUTF8`) as {KEYWORD: value or None}.

    Keywords are upper-cased (RFC 5321 § 2.4: case-insensitive); values are kept as sent.
    A repeated keyword is a syntax error (RFC 1869 § 6).
    """
    _check_chars(text)
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(key) or (eq and not _ESMTP_VALUE.fullmatch(value)):
            raise AddressSyntaxError("Malformed ESMTP parameter")
        key = key.upper()
        if key in params:
            raise AddressSyntaxError(f"Duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def _parse_local_part(local: str, *, smtputf8: bool) -> None:
    if not local:
        raise AddressError("Empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("Local part too long")
    if local.startswith('"'):
        # Quoted-string (RFC 5321 § 4.1.2): qtextSMTP = %d32-33 / %d35-91 / %d93-126,
        # quoted-pairSMTP = "\" %d32-126; RFC 6531 adds UTF8-non-ascii to qtextSMTP.
        if len(local) < 2 or not local.endswith('"'):
            raise AddressError("Unterminated quoted local part")
        body = local[1:-1]
        text: list[str] = []
        i = 0
        while i < len(body):
            c = body[i]
            if c == "\\":
                if i + 1 >= len(body) or not (" " <= body[i + 1] <= "~"):
                    raise AddressError("Bad quoted pair in local part")
                text.append(body[i + 1])
                i += 2
                continue
            if c == '"':
                raise AddressError("Stray quote in local part")
            if ord(c) > 0x7F and not smtputf8:
                raise _non_ascii()
            if not (" " <= c <= "~" or ord(c) > 0x7F):
                raise AddressError("Bad character in quoted local part")
            text.append(c)
            i += 1
        unquoted = "".join(text)
    else:
        for atom in local.split("."):
            if not atom:
                raise AddressError("Empty atom in local part")
            ascii_only = "".join(c for c in atom if ord(c) < 0x80)
            if len(ascii_only) != len(atom) and not smtputf8:
                raise _non_ascii()
            if ascii_only and not _ATEXT.fullmatch(ascii_only):
                raise AddressError("Bad character in local part")
        unquoted = local
    # Routing syntaxes older servers still honour: never relay them (see module docstring).
    if "%" in unquoted or "!" in unquoted:
        raise AddressError("Percent-hack and bang-path addresses are not accepted")
    if "@" in unquoted:
        raise AddressError("'@' in local part is not accepted")


def _non_ascii() -> AddressError:
    # RFC 6531 § 3.5: a non-ASCII address without the SMTPUTF8 parameter is 553 5.6.7.
    return AddressError("Non-ASCII address requires SMTPUTF8", enhanced="5.6.7")


def _parse_domain(domain: str, *, smtputf8: bool) -> None:
    if not domain:
        raise AddressError("Empty domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("Domain too long")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("Unterminated address literal")
        literal = domain[1:-1]
        try:
            if literal[:5].upper() == "IPV6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            # General-address-literal tags (RFC 5321 § 4.1.3) name no transport we speak.
            raise AddressError("Bad address literal") from None
        return
    for label in domain.split("."):
        if label.isascii():
            if not _LDH_LABEL.fullmatch(label):
                raise AddressError("Bad domain label")
            continue
        if not smtputf8:
            raise _non_ascii()
        # U-label (RFC 6531 § 3.3): lenient, but no spaces, controls, symbols or
        # punctuation, no ASCII outside letters-digits-hyphen; the upstream does IDNA.
        if len(label.encode("utf-8")) > 63 or label.startswith("-") or label.endswith("-"):
            raise AddressError("Bad domain label")
        for c in label:
            if c.isascii():
                if not (c.isalnum() or c == "-"):
                    raise AddressError("Bad domain label")
            elif unicodedata.category(c)[0] not in "LMN":
                raise AddressError("Bad domain label")


def parse_mailbox(s: str, *, smtputf8: bool) -> str:
    """Validate one mailbox (`local@domain`, the inside of `<...>`) and return it unchanged.

    Raises AddressSyntaxError for control characters or invalid UTF-8, AddressError for
    anything else it refuses. Nothing else escapes (property-tested with hypothesis).
    """
    _check_chars(s)
    if not s:
        raise AddressError("Empty mailbox")
    if len(s.encode("utf-8")) + 2 > MAX_PATH:
        raise AddressError("Path too long")
    if s.startswith("@"):
        # A-d-l "source route" (RFC 5321 § 4.1.2, Appendix C): MAY be ignored by
        # servers, but a relay that honours it relays anywhere. Refuse outright.
        raise AddressError("Source routes are not accepted")
    if s.startswith('"'):
        # Find the closing quote of the quoted local part, honouring backslash pairs.
        i = 1
        while i < len(s) and s[i] != '"':
            i += 2 if s[i] == "\\" else 1
        if i >= len(s):
            raise AddressError("Unterminated quoted local part")
        local, rest = s[: i + 1], s[i + 1 :]
        if not rest.startswith("@"):
            raise AddressError("Missing '@' in mailbox")
        domain = rest[1:]
    else:
        local, at, domain = s.rpartition("@")
        if not at:
            raise AddressError("Missing '@' in mailbox")
    _parse_local_part(local, smtputf8=smtputf8)
    _parse_domain(domain, smtputf8=smtputf8)
    return s
