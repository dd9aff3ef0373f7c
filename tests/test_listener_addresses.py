"""relay.addresses: the pure MAIL/RCPT argument parsers, table-tested and hypothesis-hammered."""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.errors import to_reply
from relay.delivery.deliverer import _has_control
from relay.smtp.addresses import (
    _CONTROL,
    AddressError,
    AddressSyntaxError,
    _closing_bracket,
    _closing_bracket_scanned,
    parse_mailbox,
    parse_params,
    split_path,
)


@pytest.mark.parametrize(
    "mailbox",
    [
        "user@example.com",
        "first.last+tag@sub.example.co.uk",
        "o'brien@example.com",
        '"john doe"@example.com',  # RFC 5321 § 4.1.2 Quoted-string
        '"a\\"b"@example.com',
        "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        "user@localhost",
        "x@a-b.example",
    ],
)
def test_valid_mailboxes_are_returned_unchanged(mailbox: str) -> None:
    assert parse_mailbox(mailbox, smtputf8=False) == mailbox


@pytest.mark.parametrize(
    "mailbox",
    ["用户@例子.广告", "josé@exämple.org", '"jö se"@example.com', "user@bücher.example"],
)
def test_utf8_mailboxes_need_smtputf8(mailbox: str) -> None:
    assert parse_mailbox(mailbox, smtputf8=True) == mailbox
    with pytest.raises(AddressError) as info:
        parse_mailbox(mailbox, smtputf8=False)
    assert to_reply(info.value).startswith("553 5.6.7 ")  # RFC 6531 § 3.5


@pytest.mark.parametrize(
    ("mailbox", "reply"),
    [
        ("@a.example,@b.example:user@c.example", "553 5.1.3"),  # source route
        ("@a.example:user@c.example", "553 5.1.3"),
        ("user%c.example@b.example", "553 5.1.3"),  # percent hack
        ("c.example!user@b.example", "553 5.1.3"),  # bang path
        ('"c.example!user"@b.example', "553 5.1.3"),
        ('"user@c.example"@b.example', "553 5.1.3"),
        ("user", "553 5.1.3"),
        ("user@", "553 5.1.3"),
        ("@example.com", "553 5.1.3"),
        ("a..b@example.com", "553 5.1.3"),
        (".a@example.com", "553 5.1.3"),
        ("a b@example.com", "553 5.1.3"),
        ("user@-bad.example", "553 5.1.3"),
        ("user@bad-.example", "553 5.1.3"),
        ("user@exa_mple.com", "553 5.1.3"),
        ("user@example..com", "553 5.1.3"),
        ("user@[300.1.1.1]", "553 5.1.3"),
        ("user@[tag:whatever]", "553 5.1.3"),
        ('"unterminated@example.com', "553 5.1.3"),
        ("x" * 65 + "@example.com", "553 5.1.3"),  # RFC 5321 § 4.5.3.1.1
        ("x@" + "a" * 64 + ".example", "553 5.1.3"),
        ("x@" + ("a" * 60 + ".") * 5 + "example", "553 5.1.3"),
        ("us\x00er@example.com", "501 5.5.4"),
        ("us\rer@example.com", "501 5.5.4"),
        ("us\ner@example.com", "501 5.5.4"),
        ("user@exa\udcffmple.com", "501 5.5.4"),  # invalid UTF-8 via surrogateescape
    ],
)
def test_refused_mailboxes(mailbox: str, reply: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_mailbox(mailbox, smtputf8=True)
    assert to_reply(info.value).startswith(reply + " ")


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<a@b.example>", ("a@b.example", "")),
        ("<>", ("", "")),
        (" <a@b.example>  SIZE=10 BODY=8BITMIME", ("a@b.example", "SIZE=10 BODY=8BITMIME")),
        ('<"a > b"@c.example> SMTPUTF8', ('"a > b"@c.example', "SMTPUTF8")),
        ('<"a\\"> b"@c.example>', ('"a\\"> b"@c.example', "")),
        ("a@b.example SIZE=1", ("a@b.example", "SIZE=1")),
    ],
)
def test_split_path(arg: str, expected: tuple[str, str]) -> None:
    assert split_path(arg) == expected


@pytest.mark.parametrize(
    "arg", ["", "<a@b.example", "<a@b.example>SIZE=1", "<<a@b.example>>", "a>b@c", "<a\r@b>"]
)
def test_split_path_refuses(arg: str) -> None:
    with pytest.raises(AddressSyntaxError):
        split_path(arg)


def test_parse_params() -> None:
    assert parse_params("size=10 BODY=8BITMIME SMTPUTF8") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    for bad in ("SIZE=", "=1", "SI_ZE=1", "SIZE=1 size=2", "X=a=b"):
        with pytest.raises(AddressSyntaxError):
            parse_params(bad)


# ---- properties --------------------------------------------------------------------------

SMTP_ALPHABET = st.sampled_from(
    [*"abcAZ09.@<>\"\\ %!:,[]-_=+'\r\n\x00\t", "é", "用", "\udcff", "IPv6:"]
)
address_like = st.lists(SMTP_ALPHABET, max_size=40).map("".join)


@given(st.text(max_size=300) | address_like, st.booleans())
def test_parse_mailbox_raises_only_its_own_error(s: str, smtputf8: bool) -> None:
    try:
        result = parse_mailbox(s, smtputf8=smtputf8)
    except AddressError as exc:
        assert to_reply(exc)[:3] in ("501", "553")
    else:
        # Whatever passes is returned verbatim and is safe to put in a command or header.
        assert result == s
        assert not any(c in s for c in "\r\n\x00")
        assert "%" not in s and "!" not in s and not s.startswith("@")
        assert smtputf8 or s.isascii()


@given(st.text(max_size=300) | address_like)
def test_split_path_and_params_raise_only_their_own_error(s: str) -> None:
    try:
        path, params = split_path(s)
        parse_params(params)
    except AddressSyntaxError:
        pass
    else:
        assert "\r" not in path and "\n" not in path


# atext minus "%" and "!", which the relay refuses on purpose (see relay.addresses).
LOCAL = st.from_regex(
    r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]{1,20}(\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]{1,10}){0,2}",
    fullmatch=True,
)
LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)


@given(LOCAL, st.lists(LABEL, min_size=1, max_size=4))
def test_generated_valid_addresses_pass(local: str, labels: list[str]) -> None:
    mailbox = f"{local}@{'.'.join(labels)}"
    assert parse_mailbox(mailbox, smtputf8=False) == mailbox
    assert split_path(f"<{mailbox}> SIZE=1") == (mailbox, "SIZE=1")


def test_control_characters_are_unicodes_cc_category_exactly() -> None:
    # The address checks search one regex (issue 17) where they asked unicodedata for the
    # category of every character: the same set, checked over every code point.
    for cp in range(sys.maxunicode + 1):
        c = chr(cp)
        assert (_CONTROL.search(c) is not None) == (unicodedata.category(c) == "Cc"), hex(cp)
        assert _has_control(c) == (cp < 32 or cp == 127), hex(cp)
    assert _CONTROL.search("a@b.test") is None and _CONTROL.search("a@b\r.test") is not None


@given(st.text(alphabet='<>"\\ ab@.', max_size=24))
def test_the_closing_bracket_found_by_find_is_where_the_scan_finds_it(tail: str) -> None:
    # Paths without a quoted local part skip the character-by-character scan (issue 17):
    # the same index, or the same refusal, as the scan gives.
    path = "<" + tail

    def outcome(find: Callable[[str], int]) -> int | str:
        try:
            return find(path)
        except AddressSyntaxError as exc:
            return str(exc)

    assert outcome(_closing_bracket) == outcome(_closing_bracket_scanned)
