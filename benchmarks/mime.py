"""Realistic message bodies for the large-message scenario: MIME as mail programs write it
(multipart/mixed: a quoted-printable text part, an HTML part, and a base64 attachment filling
the rest), every line at most 76 characters, the whole message about `size` bytes. Written
with LF line ends for `smtp-source -F`, which sends each line with CRLF."""

from __future__ import annotations

import base64
import random
from pathlib import Path

from benchmarks.clients import RECIPIENT, SENDER

_TEXT = (
    "Dear participant,\n\nyou are invited to take part in our annual customer survey. It "
    "takes about ten minutes and helps us improve the service you use every day. Your answers "
    "are confidential and are reported only in aggregate.\n\nThe survey closes in two weeks. "
    "The attached document explains how we handle your data.\n\nKind regards,\nThe survey team\n"
)


def _qp_lines(text: str) -> list[str]:
    out: list[str] = []
    for para in text.split("\n"):
        while len(para) > 75:
            cut = para.rfind(" ", 0, 75)
            cut = 75 if cut <= 0 else cut
            out.append(para[:cut] + "=")
            para = para[cut:]
        out.append(para)
    return out


def message(size: int, seed: int = 0) -> str:
    """One message of about `size` bytes (CRLF counted as on the wire)."""
    head = [
        f"From: Survey Team <{SENDER}>",
        f"To: <{RECIPIENT}>",
        "Subject: Your invitation to the annual customer survey",
        "Date: Fri, 04 Dec 2026 10:00:00 +0000",
        f"Message-ID: <bench-{seed}-{size}@source.example>",
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="=_bench_boundary"',
        "",
        "This is a multi-part message in MIME format.",
        "--=_bench_boundary",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        "",
        *_qp_lines(_TEXT),
        "--=_bench_boundary",
        "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        "",
        *_qp_lines("<html><body><p>" + _TEXT.replace("\n\n", "</p><p>") + "</p></body></html>"),
        "--=_bench_boundary",
        'Content-Type: application/pdf; name="privacy-notice.pdf"',
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="privacy-notice.pdf"',
        "",
    ]
    used = sum(len(x) + 2 for x in head) + len("--=_bench_boundary--") + 4
    # base64: 57 bytes of data per 76-character line (+ CRLF).
    lines = max(1, (size - used) // 78)
    data = random.Random(seed).randbytes(lines * 57)
    b64 = base64.b64encode(data).decode()
    body = [b64[i:i + 76] for i in range(0, len(b64), 76)]
    return "\n".join([*head, *body, "--=_bench_boundary--", ""])


def write(directory: Path, size: int) -> Path:
    path = directory / f"message-{size}.eml"
    path.write_text(message(size))
    return path
