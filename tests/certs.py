"""A private test certificate authority (trustme) and the server contexts tests need.

Clients trust `CertAuthority.ca_file`; sinks serve certificates from `server_context(...)`:
valid for a name, valid for the wrong name, expired, or issued by a CA nobody trusts.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import trustme


class CertAuthority:
    def __init__(self, directory: Path) -> None:
        self._ca = trustme.CA()
        self.ca_file = str(directory / "test-ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_file)

    def server_context(self, *hostnames: str, expired: bool = False) -> ssl.SSLContext:
        """A server-side context whose certificate names `hostnames` (default 'mx.test')."""
        names = hostnames or ("mx.test",)
        if expired:
            now = dt.datetime.now(dt.UTC)
            cert = self._ca.issue_cert(
                *names, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
            )
        else:
            cert = self._ca.issue_cert(*names)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        return context

    @staticmethod
    def untrusted_server_context(*hostnames: str) -> ssl.SSLContext:
        """A certificate for the right name, from a CA that no client trusts."""
        cert = trustme.CA().issue_cert(*(hostnames or ("mx.test",)))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        return context
