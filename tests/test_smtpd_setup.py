"""The aiosmtpd set-up shim answers exactly what inspect.getmembers would, for the AUTH
lookup, and stays out of every other use of inspect."""

from __future__ import annotations

import inspect

import aiosmtpd.smtp as smtp

import relay.listener  # noqa: F401  (installs the shim)
from relay.listener import _SmtpSession  # type: ignore[attr-defined]


def test_auth_members_match_the_real_inspect() -> None:
    session = object.__new__(_SmtpSession)
    real = [(n, m) for n, m in inspect.getmembers(_SmtpSession) if n.startswith("auth_")]
    shim = smtp.inspect.getmembers(session)
    assert [n for n, _ in shim] == [n for n, _ in real]
    assert {"auth_PLAIN", "auth_LOGIN"} <= {n for n, _ in shim}
    assert all(m.__self__ is session for _, m in shim)  # bound to the new session


def test_other_objects_and_functions_go_to_the_real_inspect() -> None:
    class Handler:
        def auth_X(self) -> None: ...
        def handle_DATA(self) -> None: ...

    handler = Handler()
    assert smtp.inspect.getmembers(handler) == inspect.getmembers(handler)
    assert "handle_DATA" in dict(smtp.inspect.getmembers(handler))
    assert smtp.inspect.signature is inspect.signature
