"""relay.auth: scrypt password hashes and the users file (real files, real scrypt)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from relay.smtp.users import (
    HashFormatError,
    UsersFileError,
    hash_password,
    load_users,
    parse_users,
    prompt_new_password_hash,
    verify_password,
)

CHEAP = 2**10  # keeps the suite fast; the default (2**14) is exercised once below


def test_hash_format_and_round_trip() -> None:
    encoded = hash_password("s3cret")
    scheme, n, r, p, salt, key = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt + "==")) == 16
    assert len(base64.b64decode(key + "=" * (-len(key) % 4))) == 32
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert hash_password("s3cret") != encoded  # fresh salt each time


def test_known_vector_and_padding_is_optional() -> None:
    # Computed independently: hashlib.scrypt(b"pw", salt=b"saltsalt", n=1024, r=8, p=1, dklen=32)
    import hashlib

    key = hashlib.scrypt(b"pw", salt=b"saltsalt", n=1024, r=8, p=1, dklen=32)
    padded = (
        f"scrypt$1024$8$1${base64.b64encode(b'saltsalt').decode()}${base64.b64encode(key).decode()}"
    )
    assert verify_password("pw", padded)
    assert verify_password("pw", padded.rstrip("="))
    assert hash_password("pw", n=1024, salt=b"saltsalt") == padded.replace("=", "")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "plain",
        "bcrypt$10$abc",
        "scrypt$1000$8$1$c2FsdHNhbHQ$" + "A" * 43,  # N not a power of two
        "scrypt$1048576$64$1$c2FsdHNhbHQ$" + "A" * 43,  # 8 GiB of memory: refused
        "scrypt$1024$8$1$!!!$" + "A" * 43,
        "scrypt$1024$8$1$c2FsdA$" + "A" * 43,  # 4-byte salt
        "scrypt$1024$8$1$c2FsdHNhbHQ$QUJD",  # 3-byte key
        "scrypt$x$8$1$c2FsdHNhbHQ$" + "A" * 43,
    ],
)
def test_malformed_hashes_are_errors_not_mismatches(bad: str) -> None:
    with pytest.raises(HashFormatError):
        verify_password("pw", bad)


def test_users_file(tmp_path: Path) -> None:
    alice = hash_password("alice-pw", n=CHEAP)
    bob = hash_password("bob pw with spaces", n=CHEAP)
    path = tmp_path / "users"
    path.write_text(f"# SMTP AUTH users\n\nalice:{alice}\n  bob@example.com : {bob}  \n")
    users = load_users(path)
    assert len(users) == 2 and "alice" in users and "bob@example.com" in users
    assert users.verify("alice", "alice-pw")
    assert not users.verify("alice", "bob pw with spaces")
    assert users.verify("bob@example.com", "bob pw with spaces")
    assert not users.verify("carol", "alice-pw")  # unknown user: plain False
    assert "alice-pw" not in repr(users) and alice not in repr(users)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("alice\n", 1, "expected 'user:hash'"),
        ("# c\n:scrypt$...\n", 2, "user name must be non-empty"),
        ("al ice:x\n", 1, "user name must be non-empty"),
        ("\n\nalice:plaintext-password\n", 3, "invalid hash for 'alice'"),
        ("alice:{h}\nalice:{h}\n", 2, "duplicate user 'alice'"),
    ],
)
def test_users_file_errors_name_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = tmp_path / "users"
    path.write_text(text.format(h=hash_password("x", n=CHEAP)))
    with pytest.raises(UsersFileError) as info:
        load_users(path)
    assert str(info.value).startswith(f"{path}:{line}: {message}")
    assert "plaintext-password" not in str(info.value)  # never echo what was in the hash slot


def test_parse_users_source_name() -> None:
    with pytest.raises(UsersFileError, match=r"^<inline>:1: "):
        parse_users("nope", source="<inline>")


def test_prompt_new_password_hash() -> None:
    answers = iter(["pw1", "pw1"])
    encoded = prompt_new_password_hash(lambda prompt: next(answers))
    assert verify_password("pw1", encoded)
    answers = iter(["pw1", "pw2"])
    with pytest.raises(ValueError, match="do not match"):
        prompt_new_password_hash(lambda prompt: next(answers))
    with pytest.raises(ValueError, match="empty"):
        prompt_new_password_hash(lambda prompt: "")
