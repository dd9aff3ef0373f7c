"""RFC 3464 DSNs: parse what build_dsn makes with the `email` package and check every field."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest

from relay.bounce.dsn import build_dsn, should_send_dsn
from relay.core.model import Reply

ARRIVAL = 1_700_000_000.0  # 2023-11-14T22:13:20Z
NOW = ARRIVAL + 3600
ORIGINAL = (
    b"From: App <app@saas.test>\r\n"
    b"To: someone@customer.test\r\n"
    b"Subject: Your invoice\r\n"
    b"Message-ID: <abc@saas.test>\r\n"
    b"\r\n"
    b"Body that must not be in the DSN.\r\n"
)


def build(**overrides: object) -> bytes:
    values: dict[str, object] = {
        "reporting_mta": "relay1.example.net",
        "original_sender": "app@saas.test",
        "queue_id": "Q0001",
        "arrival": ARRIVAL,
        "failures": [
            ("gone@customer.test", "bounced", Reply(550, "5.1.1 no such user", "5.1.1")),
            ("slow@customer.test", "expired", Reply(451, "4.4.1 connection refused", "4.4.1")),
        ],
        "original_headers": ORIGINAL,
        "now": NOW,
    }
    values.update(overrides)
    return build_dsn(**values)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def part(msg: EmailMessage, index: int) -> EmailMessage:
    parts = msg.get_payload()
    assert isinstance(parts, list)
    found = parts[index]
    assert isinstance(found, EmailMessage)
    return found


def status_blocks(raw: bytes) -> list[Message]:
    """The per-message block, then one block per recipient, of the delivery-status part."""
    blocks = part(parse(raw), 1).get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def test_top_level_headers() -> None:
    msg = parse(build())
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay1.example.net"
    assert msg["To"].addresses[0].addr_spec == "app@saas.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert re.fullmatch(r"<Q0001\.\d+\.[0-9a-f]+@relay1\.example\.net>", msg["Message-ID"])
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert not msg.defects


def test_three_parts_in_order() -> None:
    msg = parse(build())
    assert [part(msg, i).get_content_type() for i in range(3)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_human_part_quotes_the_upstream_reply() -> None:
    human = part(parse(build()), 0)
    text = human.get_content()
    assert "relay1.example.net" in text
    assert "Q0001" in text
    assert "<gone@customer.test>:" in text
    assert "550 5.1.1 no such user" in text
    assert "<slow@customer.test>:" in text
    assert "could not be delivered in time" in text
    assert "451 4.4.1 connection refused" in text


def test_delivery_status_fields() -> None:
    per_message, gone, slow = status_blocks(build())
    assert per_message["Reporting-MTA"] == "dns; relay1.example.net"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_message["X-Relay-Queue-ID"] == "Q0001"

    assert gone["Final-Recipient"] == "rfc822; gone@customer.test"
    assert gone["Action"] == "failed"
    assert gone["Status"] == "5.1.1"
    assert gone["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"

    assert slow["Final-Recipient"] == "rfc822; slow@customer.test"
    assert slow["Action"] == "failed"
    assert slow["Status"] == "5.4.7"  # RFC 3463: delivery time expired
    assert slow["Diagnostic-Code"] == "smtp; 451 4.4.1 connection refused"


def test_status_without_enhanced_code() -> None:
    failures = [("a@x.test", "bounced", Reply(550, "mailbox unavailable"))]
    assert status_blocks(build(failures=failures))[1]["Status"] == "5.0.0"


def test_original_headers_part_has_headers_only() -> None:
    raw = part(parse(build()), 2).get_payload(decode=True)
    assert isinstance(raw, bytes)
    assert b"Subject: Your invoice" in raw
    assert b"Message-ID: <abc@saas.test>" in raw
    assert b"Body that must not be" not in raw


def test_crlf_only_and_line_length_limit() -> None:
    long_text = "5.7.1 " + " ".join(f"word{i}" for i in range(400))
    long_token = "5.7.1 " + "x" * 3000
    failures = [
        ("a@x.test", "bounced", Reply(554, long_text, "5.7.1")),
        ("b@x.test", "bounced", Reply(554, long_token, "5.7.1")),
    ]
    headers = b"Subject: " + b"y" * 2500 + b"\nX-Bare-LF: yes\n"
    raw = build(failures=failures, original_headers=headers)
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    status = status_blocks(raw)
    # Folded fields unfold to the upstream's exact words.
    assert status[1]["Diagnostic-Code"] == f"smtp; 554 {long_text}"
    assert status[2]["Diagnostic-Code"].replace(" ", "") == f"smtp;554{long_token}".replace(" ", "")


def test_non_ascii_recipient_uses_rfc_6533_types() -> None:
    failures = [("jösé@x.test", "bounced", Reply(550, "5.1.1 no such user", "5.1.1"))]
    msg = parse(build(failures=failures))
    assert msg.get_param("report-type") == "global-delivery-status"
    assert part(msg, 1).get_content_type() == "message/global-delivery-status"


def test_never_to_the_null_sender_nor_without_failures() -> None:
    with pytest.raises(ValueError, match="null sender"):
        build(original_sender="")
    with pytest.raises(ValueError, match="at least one"):
        build(failures=[])
    with pytest.raises(ValueError, match="unknown failure kind"):
        build(failures=[("a@x.test", "delayed", Reply(450, "x"))])


@pytest.mark.parametrize(
    ("sender", "is_dsn", "send"),
    [
        ("app@saas.test", False, True),
        ("", False, False),
        ("app@saas.test", True, False),
        ("", True, False),
    ],
)
def test_should_send_dsn(sender: str, is_dsn: bool, send: bool) -> None:
    assert should_send_dsn(sender, is_dsn) is send


def test_header_part_ends_with_its_own_line_break() -> None:
    raw = build()
    # The CRLF just before a boundary belongs to the boundary (RFC 2046 § 5.1.1), so the
    # last original header keeps its own CRLF only if a blank line follows it.
    assert b"Message-ID: <abc@saas.test>\r\n\r\n--" in raw
    raw_headers = part(parse(raw), 2).get_payload(decode=True)
    assert isinstance(raw_headers, bytes)
    assert raw_headers.endswith(b"Message-ID: <abc@saas.test>\r\n\r\n") or raw_headers.endswith(
        b"Message-ID: <abc@saas.test>\r\n"
    )


def test_queue_id_is_sanitised_in_message_id() -> None:
    msg = parse(build(queue_id="a b<c>@d"))
    assert re.fullmatch(r"<a_b_c__d\.\d+\.[0-9a-f]+@relay1\.example\.net>", msg["Message-ID"])
    assert "a b<c>@d" in part(msg, 0).get_content()
