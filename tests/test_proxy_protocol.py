"""PROXY protocol v1/v2 on a listener (issue 12): opt-in per listener, only from the
configured load balancers, the real client address then drives allowlisting, limits, the
Received header and the mail log. The parser is checked against aiosmtpd's
(aiosmtpd.proxy_protocol) as the reference; end to end through `relay serve`."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path

import pytest
from aiosmtpd.proxy_protocol import get_proxy
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.proxyproto import V2_SIGNATURE, ProxyError, parse
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream
from tests.sinks import ThreadedSink


def v1(src: str, port: int, dst: str = "10.0.0.1", family: str = "") -> bytes:
    fam = family or ("TCP6" if ":" in src else "TCP4")
    dst = "::1" if fam == "TCP6" and ":" not in dst else dst
    return f"PROXY {fam} {src} {dst} {port} 25\r\n".encode()


def v2(src: str, port: int, *, command: int = 1, tlv: bytes = b"") -> bytes:
    ip = ipaddress.ip_address(src)
    if ip.version == 4:
        family, addrs = 0x11, ip.packed + ipaddress.IPv4Address("10.0.0.1").packed
    else:
        family, addrs = 0x21, ip.packed + ipaddress.IPv6Address("::1").packed
    body = addrs + struct.pack("!HH", port, 25) + tlv
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


# -- the parser -----------------------------------------------------------------------------------


def test_parser_table() -> None:
    assert parse(v1("203.0.113.7", 40000) + b"EHLO x\r\n") == parse(v1("203.0.113.7", 40000))
    header = parse(v1("203.0.113.7", 40000))
    assert header is not None and header.source == ("203.0.113.7", 40000)
    assert parse(b"PROXY UNKNOWN\r\n") is not None and parse(b"PROXY UNKNOWN\r\n").source is None  # type: ignore[union-attr]
    assert parse(v2("2001:db8::5", 1)).source == ("2001:db8::5", 1)  # type: ignore[union-attr]
    assert parse(v2("198.51.100.9", 1234, tlv=b"\x04\x00\x01x")).source == ("198.51.100.9", 1234)  # type: ignore[union-attr]
    assert parse(v2("198.51.100.9", 1234, command=0)).source is None  # type: ignore[union-attr]
    whole = v2("198.51.100.9", 1234)
    for cut in range(len(whole)):  # every prefix is "not yet", never an error
        assert parse(whole[:cut]) is None
    for cut in range(1, 20):
        assert parse(v1("203.0.113.7", 40000)[:cut]) is None
    for bad in (
        b"EHLO client\r\n", b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 25\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 25\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 25\r\n", b"PROXY " + b"x" * 200,
        V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + bytes(12),  # version 3
        V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),  # longer than we accept
        V2_SIGNATURE + bytes([0x21, 0x12, 0, 12]) + bytes(12),  # UDP
    ):
        with pytest.raises(ProxyError):
            parse(bad)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def readexactly(self, n: int) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        if len(out) < n:
            raise asyncio.IncompleteReadError(out, n)
        return out

    async def read(self, n: int = -1) -> bytes:
        out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return out

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        i = self.data.find(separator)
        if i < 0:
            raise asyncio.IncompleteReadError(self.data, None)
        out, self.data = self.data[: i + len(separator)], self.data[i + len(separator):]
        return out


ADDRESS = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
)


@settings(max_examples=150, deadline=None)
@given(src=ADDRESS, port=st.integers(0, 65535), version=st.sampled_from([1, 2]))
def test_parser_agrees_with_aiosmtpd(src: str, port: int, version: int) -> None:
    raw = v1(src, port) if version == 1 else v2(src, port)
    ours = parse(raw)
    reference = asyncio.run(get_proxy(_Reader(raw)))
    assert reference.valid, reference.error
    assert ours is not None and ours.length == len(raw)
    assert ours.source == (str(ipaddress.ip_address(str(reference.src_addr))), reference.src_port)


# -- end to end ---------------------------------------------------------------------------------


def _dialog(port: int, header: bytes, source: str = "127.0.0.1") -> list[bytes]:
    """Send the header, then a transaction; the first line of each reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(header)
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if not line or line[3:4] != b"-":
                    return line.rstrip(b"\r\n")

        out = [reply()]
        if not out[0].startswith(b"220"):
            return out
        for cmd in (b"EHLO app.test", b"MAIL FROM:<app@acme.test>", b"RCPT TO:<r@x.test>", b"DATA"):
            s.sendall(cmd + b"\r\n")
            out.append(reply())
            if out[-1][:1] not in (b"2", b"3"):
                return out
        s.sendall(b"Subject: via balancer\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        out.append(reply())
        return out


def test_the_balancers_header_decides_who_the_client_is(tmp_path: Path) -> None:
    with ThreadedSink() as sink:
        cfg = RelayConfig(
            tmp_path / "relay",
            upstreams={"up": plain_upstream(sink.port)},
            default_upstream="up",
            listeners=[{"name": "smtp", "address": "127.0.0.1", "port": 0,
                        "proxy_protocol": True, "proxy_from": ["127.0.0.1/32"]}],
            clients={"networks": ["203.0.113.0/24", "2001:db8::/32"]},
        )
        with RelayProcess(cfg.write()) as relay:
            # Through the balancer for an allowlisted client: v1 and v2, IPv4 and IPv6.
            for header in (v1("203.0.113.7", 40000), v2("2001:db8::5", 40001)):
                assert _dialog(relay.port, header)[-1].startswith(b"250 2.0.0"), header
            # Through the balancer for a client outside the allowlist: relay access denied.
            denied = _dialog(relay.port, v1("198.51.100.1", 40002))
            assert denied[-1].startswith(b"554 5.7.1"), denied
            # The balancer itself (127.0.0.1) is not a client: no header, no service.
            assert _dialog(relay.port, b"EHLO x\r\n")[-1].startswith(b"421 4.7.0")
            # A connection from elsewhere than a configured balancer is refused at once.
            assert _dialog(relay.port, v1("203.0.113.7", 1), source="127.0.0.2")[0].startswith(
                b"554 5.7.1"
            )
            sink.wait_for(2)
            received = [e for e in relay.mail_log() if e["event"] == "received"]
            assert [e["client"] for e in received] == ["203.0.113.7", "2001:db8::5"]
    assert b"([203.0.113.7])" in sink.messages[0].data  # our Received header names the client
    assert b"([IPv6:2001:db8::5])" in sink.messages[1].data


def test_proxy_protocol_needs_its_balancers_and_no_implicit_tls(tmp_path: Path) -> None:
    from relay.config import ConfigErrors, load_config

    (tmp_path / "relay.yaml").write_text(
        "listeners:\n  - {port: 2525, proxy_protocol: true}\n"
        "  - {port: 465, tls: implicit, cert_file: c, key_file: k, proxy_protocol: true,"
        " proxy_from: [10.0.0.0/8]}\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config(tmp_path, environ={})
    text = str(caught.value)
    assert "relay.yaml:2: listeners[0]: proxy_protocol: true needs proxy_from" in text
    assert "relay.yaml:3: listeners[1]: proxy_protocol cannot be used with tls: implicit" in text
