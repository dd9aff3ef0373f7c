"""The test harness's own reading of a running relay's mail log (tests/relayproc.py)."""

from __future__ import annotations

from pathlib import Path

from tests.relayproc import RelayProcess


def test_a_mail_log_line_still_being_written_is_left_for_the_next_read(tmp_path: Path) -> None:
    # The relay appends while tests poll: a read can end half-way through a line.
    log = tmp_path / "mail.log"
    log.write_text('{"event":"received","queue_id":"A"}\n{"event":"delivered","queue_id":"A","org":"')
    relay = RelayProcess(tmp_path)
    assert relay.mail_log() == [{"event": "received", "queue_id": "A"}]
    with log.open("a") as f:
        f.write('contoso"}\n')
    assert [e["event"] for e in relay.mail_log()] == ["received", "delivered"]
    assert relay.events("delivered") == [{"event": "delivered", "queue_id": "A", "org": "contoso"}]
