"""Loading configuration: the shipped examples, secret references, units, YAML lines, defaults."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import ConfigErrors, load_config
from relay.config.load import effective
from relay.config.secrets import SecretUnavailable, resolve_secret
from relay.config.units import parse_duration, parse_size
from relay.config.yamlsrc import load_yaml
from relay.core.model import Secret, TlsMode

REPO = Path(__file__).resolve().parent.parent
# Every secret the examples reference, with values that must never be printed.
EXAMPLE_ENV = {
    "SENDGRID_API_KEY": "SG.s3cret-sendgrid-key",
    "MAILJET_API_KEY": "mj-publ1c-half-of-the-key",
    "MAILJET_SECRET_KEY": "mj-s3cret-half-of-the-key",
    "EUROSTUDY_SMTP_PASSWORD": "eurostudy-s3cret",
    "GLOBEX_RAJ_SMTP_PASSWORD": "raj-s3cret",
    "RELAY_ADMIN_TOKEN": "admin-t0ken-s3cret",
    "FABRIKAM_ENTRA_SECRET": "fabrikam-entra-s3cret",
    "FABRIKAM_SMTP_PASSWORD": "fabrikam-smtp-s3cret",
    "FABRIKAM_GOOGLE_SA_KEY": '{"type": "service_account", "private_key": "s3cret"}',
}
CONTOSO_SECRET = "contoso-f1le-s3cret"
SECRETS = (*EXAMPLE_ENV.values(), CONTOSO_SECRET)


def clean_env() -> dict[str, str]:
    drop = {*EXAMPLE_ENV, "CREDENTIALS_DIRECTORY"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def relay(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def examples_with_secrets(tmp_path: Path) -> Path:
    """A copy of config/ and policies/ whose contoso secret is a file next to relay.yaml."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    contoso = tmp_path / "policies" / "contoso.yaml"
    text = contoso.read_text()
    assert "file:/etc/egress-relay/secrets/contoso-smtp" in text
    contoso.write_text(
        text.replace("file:/etc/egress-relay/secrets/contoso-smtp", "file:secrets/contoso-smtp")
    )
    (tmp_path / "config" / "secrets").mkdir()
    (tmp_path / "config" / "secrets" / "contoso-smtp").write_text(CONTOSO_SECRET + "\n")
    return tmp_path / "config"


def line_of(rel: str, prefix: str) -> int:
    """The 1-based line of the first line of REPO/rel that starts with `prefix`."""
    lines = (REPO / rel).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(prefix))


# -- the shipped examples ------------------------------------------------------------------


def test_examples_are_valid_with_warnings_for_the_unset_secrets() -> None:
    proc = relay("check", "-c", "config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "config/relay.yaml: OK (5 organisations, 8 upstreams, 4 egress sources)\n"
    warnings = proc.stderr.splitlines()
    assert all(w.startswith("warning: ") for w in warnings)
    # Line numbers are looked up, so that documenting a new key in the examples moves them.
    # An upstream's warning points at the line that routes mail to it (issue 12, finding 8).
    for expected in (
        f"config/relay.yaml:{line_of('config/relay.yaml', 'default_upstream:')}: upstream"
        " 'sendgrid' (used by default_upstream): environment variable SENDGRID_API_KEY",
        f"policies/eurostudy.yaml:{line_of('policies/eurostudy.yaml', 'upstream: mailjet')}:"
        " upstream 'mailjet' (used by organisation 'eurostudy'): environment variable"
        " MAILJET_API_KEY",
        f"policies/contoso.yaml:{line_of('policies/contoso.yaml', 'upstream:')}: upstream"
        " 'contoso/contoso-smtp' (used by organisation 'contoso'):"
        " file:/etc/egress-relay/secrets/contoso-smtp: cannot read",
        f"policies/eurostudy.yaml:{line_of('policies/eurostudy.yaml', '    upstream: own-relay')}:"
        " upstream 'eurostudy/own-relay' (used by account 'jonas@eurostudy.example'):"
        " environment variable EUROSTUDY_SMTP_PASSWORD",
        f"policies/globex.yaml:{line_of('policies/globex.yaml', '    upstream: raj-office')}:"
        " upstream 'globex/raj-office' (used by account 'raj@globex.example'): environment"
        " variable GLOBEX_RAJ_SMTP_PASSWORD",
        f"config/relay.yaml:{line_of('config/relay.yaml', '  token:')}: admin token:"
        " environment variable RELAY_ADMIN_TOKEN is not set",
        f"policies/fabrikam.yaml:{line_of('policies/fabrikam.yaml', 'upstream: m365')}: upstream"
        " 'fabrikam/m365' (used by organisation 'fabrikam'): environment variable"
        " FABRIKAM_ENTRA_SECRET",
        f"policies/fabrikam.yaml:{line_of('policies/fabrikam.yaml', '    previous:')}: upstream"
        " 'fabrikam/m365-password' (used by upstream 'fabrikam/m365' until it is verified):"
        " environment variable FABRIKAM_SMTP_PASSWORD",
        f"policies/fabrikam.yaml:{line_of('policies/fabrikam.yaml', '    upstream: workspace')}:"
        " upstream 'fabrikam/workspace' (used by account 'hr@fabrikam-clinics.example'):"
        " environment variable FABRIKAM_GOOGLE_SA_KEY",
    ):
        assert any(w.startswith("warning: " + expected) for w in warnings), expected
    assert len(warnings) == 9


def test_examples_fail_strict_check_while_secrets_are_unset() -> None:
    proc = relay("check", "--strict", "-c", "config")
    assert proc.returncode == 1
    assert "SENDGRID_API_KEY is not set" in proc.stderr
    assert proc.stdout == ""


def test_examples_pass_strict_check_with_every_secret_set(examples_with_secrets: Path) -> None:
    env = {**clean_env(), **EXAMPLE_ENV}
    proc = relay("check", "--strict", "-c", "config", cwd=examples_with_secrets.parent, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "OK (5 organisations" in proc.stdout
    for sender in ("a@acme-surveys.example", "anna@eurostudy.example", "marie@globex.example"):
        routed = relay(
            "route",
            "-c",
            "config",
            "--sender",
            sender,
            "--json",
            cwd=examples_with_secrets.parent,
            env=env,
        )
        assert routed.returncode == 0, routed.stderr
        for s in SECRETS:
            assert s not in routed.stdout + routed.stderr


def test_examples_resolve_every_secret_in_process(examples_with_secrets: Path) -> None:
    config = load_config(examples_with_secrets, environ=EXAMPLE_ENV)
    assert config.warnings == []
    ups = config.upstreams
    assert sorted(ups) == [
        "contoso/contoso-smtp",
        "eurostudy/own-relay",
        "fabrikam/m365",
        "fabrikam/m365-password",
        "fabrikam/workspace",
        "globex/raj-office",
        "mailjet",
        "sendgrid",
    ]
    assert all(u.unavailable is None for u in ups.values())
    assert ups["sendgrid"].username == "apikey"
    assert ups["sendgrid"].password == Secret(EXAMPLE_ENV["SENDGRID_API_KEY"], "x")
    assert ups["mailjet"].username == EXAMPLE_ENV["MAILJET_API_KEY"]
    assert config.username_refs == {"mailjet": "env:MAILJET_API_KEY"}
    contoso = ups["contoso/contoso-smtp"]
    assert contoso.password is not None and contoso.password.reveal() == CONTOSO_SECRET
    assert (contoso.host, contoso.port, contoso.tls) == (
        "smtp.contoso-health.example",
        465,
        TlsMode.IMPLICIT,
    )
    text = repr(config) + str(config.upstreams) + str(effective(config))
    # Upstream.username is a plain str in the shared model, so Mailjet's API key (its SMTP
    # user name) is in the repr; `relay route` shows its reference instead (test_cli).
    for s in set(SECRETS) - {EXAMPLE_ENV["MAILJET_API_KEY"]}:
        assert s not in text


def test_missing_secret_marks_only_its_upstream_unavailable() -> None:
    env = dict(EXAMPLE_ENV)
    del env["GLOBEX_RAJ_SMTP_PASSWORD"]
    config = load_config(REPO / "config", environ=env)
    raj = config.upstreams["globex/raj-office"]
    assert raj.unavailable == (
        "credential unavailable: environment variable GLOBEX_RAJ_SMTP_PASSWORD is not set"
    )
    assert raj.password is None
    assert config.upstreams["sendgrid"].unavailable is None
    assert config.upstreams["contoso/contoso-smtp"].unavailable is not None  # /etc file absent
    assert len(config.warnings) == 2
    assert config.upstreams["fabrikam/m365"].oauth is not None  # its secret is in env


def test_relay_check_binds_nothing(tmp_path: Path) -> None:
    # Hold the listener's and the admin API's ports ourselves: a check that tried to bind
    # would fail (or at least not exit 0 with nothing said).
    with socket.socket() as smtp, socket.socket() as admin:
        smtp.bind(("127.0.0.1", 0))
        admin.bind(("127.0.0.1", 0))
        smtp.listen()
        admin.listen()
        (tmp_path / "relay.yaml").write_text(
            f"listeners: [{{port: {smtp.getsockname()[1]}}}]\n"
            f"admin: {{port: {admin.getsockname()[1]}}}\n"
            "upstreams: {sendgrid: {password: env:SG}, mailjet: {username: env:MJ,"
            " password: env:MJ}}\n"
        )
        proc = relay(
            "check", "--strict", "-c", str(tmp_path), env={**clean_env(), "SG": "x", "MJ": "y"}
        )
    assert proc.returncode == 1  # strict: the admin API has no token
    proc_warn = proc.stderr.splitlines()
    assert proc_warn == [
        f"warning: {tmp_path}/relay.yaml:2: admin API has no token:"
        " only /healthz, /readyz and /metrics are served"
    ]


def test_config_file_may_be_named_directly_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "other.yaml").write_text("hostname: relay.example.net\n")
    assert load_config(tmp_path / "other.yaml", environ={}).hostname == "relay.example.net"
    proc = relay("check", "-c", "nowhere", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == "nowhere:1: cannot read: No such file or directory\n"


def test_policy_errors_are_reported_even_when_relay_yaml_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "relay.yaml").write_text("hostname: 12\n")
    (tmp_path / "policies" / "a.yaml").write_text("org: a\nbogus: 1\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(tmp_path, environ={})
    assert [str(e) for e in caught.value.errors] == [
        f"{tmp_path}/policies/a.yaml:2: bogus: unknown key",
        f"{tmp_path}/relay.yaml:1: hostname: Input should be a valid string",
    ]


# -- secret references ---------------------------------------------------------------------


def test_env_reference() -> None:
    s = resolve_secret("env:TOKEN", base_dir=Path("/nonexistent"), environ={"TOKEN": "t0p"})
    assert s.reveal() == "t0p" and s.source == "env:TOKEN"
    with pytest.raises(SecretUnavailable, match=r"^environment variable TOKEN is not set$"):
        resolve_secret("env:TOKEN", base_dir=Path("."), environ={})
    with pytest.raises(SecretUnavailable, match="not set"):
        resolve_secret("env:TOKEN", base_dir=Path("."), environ={"TOKEN": ""})


def test_file_reference_is_relative_to_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_text("f1le-secret\r\n")
    rel = resolve_secret("file:secrets/pw", base_dir=tmp_path, environ={})
    assert rel.reveal() == "f1le-secret"
    absolute = resolve_secret(f"file:{tmp_path}/secrets/pw", base_dir=Path("/"), environ={})
    assert absolute.reveal() == "f1le-secret"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecretUnavailable, match="is empty"):
        resolve_secret("file:empty", base_dir=tmp_path, environ={})
    with pytest.raises(SecretUnavailable, match="No such file"):
        resolve_secret("file:missing", base_dir=tmp_path, environ={})


def test_credential_reference_reads_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "contoso-smtp").write_text("cred-s3cret")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert resolve_secret("credential:contoso-smtp", base_dir=Path("/"), environ=env).reveal() == (
        "cred-s3cret"
    )
    with pytest.raises(SecretUnavailable, match="CREDENTIALS_DIRECTORY is not set"):
        resolve_secret("credential:contoso-smtp", base_dir=Path("/"), environ={})
    with pytest.raises(SecretUnavailable, match="cannot read"):
        resolve_secret("credential:other", base_dir=Path("/"), environ=env)


def test_credential_reference_through_load_config(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "sg").write_text("cred-sendgrid-s3cret\n")
    (tmp_path / "relay.yaml").write_text("upstreams:\n  sendgrid:\n    password: credential:sg\n")
    config = load_config(tmp_path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    password = config.upstreams["sendgrid"].password
    assert password is not None and password.reveal() == "cred-sendgrid-s3cret"
    assert "cred-sendgrid-s3cret" not in repr(config) + " ".join(config.warnings)


def test_secret_never_shows_its_value() -> None:
    s = Secret("v4lue-s3cret", "env:X")
    assert "v4lue-s3cret" not in repr(s) + str(s) + f"{s}" + repr([s]) + repr({"k": s})
    assert str(s) == "Secret(env:X)"


def test_unreadable_secret_errors_name_the_reference_not_a_value(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_text(
        "upstreams:\n  sendgrid:\n    password: file:missing-secret\n"
    )
    config = load_config(tmp_path, environ={"MAILJET_API_KEY": "a", "MAILJET_SECRET_KEY": "b"})
    assert config.upstreams["sendgrid"].unavailable is not None
    sendgrid_warnings = [w for w in config.warnings if "sendgrid" in w]
    assert sendgrid_warnings == [  # default_upstream is not set: sendgrid is the default
        f"{tmp_path}/relay.yaml:1: upstream 'sendgrid' (used by default_upstream, which is not"
        f" set): file:missing-secret: cannot read {tmp_path}/missing-secret: No such file or"
        " directory; its mail will wait in the queue"
    ]


# -- units ---------------------------------------------------------------------------------

DURATION_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


@given(
    n=st.integers(0, 10**6),
    unit=st.sampled_from(sorted(DURATION_UNITS)),
    space=st.sampled_from(["", " "]),
)
def test_duration_round_trip(n: int, unit: str, space: str) -> None:
    assert parse_duration(f"{n}{space}{unit}") == pytest.approx(n * DURATION_UNITS[unit])


@given(st.floats(0, 10**7, allow_nan=False))
def test_duration_numbers_are_seconds(x: float) -> None:
    assert parse_duration(x) == x
    assert parse_duration(f"{x:.3f}s") == pytest.approx(round(x, 3))


@given(n=st.integers(0, 10**6), unit=st.sampled_from(sorted(SIZE_UNITS)), upper=st.booleans())
def test_size_round_trip(n: int, unit: str, upper: bool) -> None:
    text = f"{n}{unit.upper() if upper else unit}"
    assert parse_size(text) == n * SIZE_UNITS[unit]
    assert parse_size(n) == n


@pytest.mark.parametrize(
    "bad", [True, -1, -0.5, "", "5 minutes", "5x", "-5m", "m", "1e3s", None, [5]]
)
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", [False, -1, 1.5, "", "25 MBs", "1.5MB", "MB", "-3", None])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_units_in_the_schema() -> None:
    config = load_config(REPO / "config", environ=EXAMPLE_ENV)
    lst = config.relay.listeners[0]
    assert (lst.max_message_size, lst.idle_timeout, lst.session_timeout) == (
        35 * 1024**2,
        300.0,
        1800.0,
    )
    assert config.relay.retry.schedule == [60, 300, 900, 1800, 3600, 7200, 14400]
    assert config.relay.retry.max_age == 5 * 86400
    assert config.upstreams["contoso/contoso-smtp"].throttle.min_interval == 1.0


# -- YAML with line numbers ----------------------------------------------------------------


@given(
    # A prefix: YAML 1.1 reads keys such as `no`, `on` or `y` as booleans.
    keys=st.lists(
        st.from_regex(r"k[a-z]{0,7}", fullmatch=True), min_size=1, max_size=8, unique=True
    ),
    data=st.data(),
)
@settings(max_examples=50)
def test_duplicate_keys_are_reported_at_their_line(keys: list[str], data: st.DataObject) -> None:
    first = data.draw(st.integers(0, len(keys) - 1))
    at = data.draw(st.integers(first + 1, len(keys)))
    nested = data.draw(st.booleans())
    lines = [f"{k}: {i}" for i, k in enumerate(keys)]
    lines.insert(at, f"{keys[first]}: again")
    indent = "  " if nested else ""
    text = ("outer:\n" if nested else "") + "".join(f"{indent}{line}\n" for line in lines)
    offset = 2 if nested else 1
    src, errors = load_yaml(text, "f.yaml")
    assert [str(e) for e in errors] == [
        f"f.yaml:{at + offset}: duplicate key '{keys[first]}' (first at line {first + offset})"
    ]
    value = src.value["outer"] if nested else src.value
    assert value == {k: i for i, k in enumerate(keys)}  # the first one is kept


def test_lines_of_nested_keys_and_items() -> None:
    src, errors = load_yaml("a:\n  b:\n    - x\n    - {c: 1}\n", "f.yaml")
    assert errors == []
    assert src.line_of(("a",)) == 1
    assert src.line_of(("a", "b", 1, "c")) == 4
    assert src.line_of(("a", "b", 0)) == 3
    assert src.line_of(("a", "missing", "deeper")) == 1  # the deepest known parent


def test_yaml_problems_are_errors_not_exceptions() -> None:
    for text, expected in [
        (
            "a: [1\n",  # the end of the stream is after line 1's newline: still line 1
            "f.yaml:1: YAML syntax: while parsing a flow sequence,"
            " expected ',' or ']', but got '<stream end>'",
        ),
        ("a: !!int nope\n", "f.yaml:1: the value is not a valid int"),
        ("a: !custom 1\n", "f.yaml:1: could not determine a constructor for the tag '!custom'"),
        ("a: &x [*x]\n", "f.yaml:1: recursive alias"),
        ("base: &b {x: 1}\nc:\n  <<: *b\n", "f.yaml:3: merge keys (<<) are not supported"),
        ("? [a]\n: 1\n", "f.yaml:1: a key must be a string"),
        (
            "---\na: 1\n---\nb: 2\n",
            "f.yaml:3: YAML syntax: expected a single document in the stream,"
            " but found another document",
        ),
    ]:
        _, errors = load_yaml(text, "f.yaml")
        assert [str(e) for e in errors] == [expected], text


# -- embedded defaults ---------------------------------------------------------------------


def test_embedded_defaults() -> None:
    config = load_config(
        None, environ={"SENDGRID_API_KEY": "a", "MAILJET_API_KEY": "b", "MAILJET_SECRET_KEY": "c"}
    )
    assert config.file == "<defaults>"
    assert config.hostname == "localhost"
    [lst] = config.relay.listeners
    assert (lst.name, lst.address, lst.port, lst.tls) == ("smtp", "127.0.0.1", 2525, "none")
    assert config.relay.clients.networks == ["127.0.0.0/8", "::1/128"]
    assert list(config.pools) == ["default"]
    assert [s.address for s in config.pools["default"].sources] == ["127.0.0.1"]
    assert config.default_upstream == "sendgrid"
    sg, mj = config.upstreams["sendgrid"], config.upstreams["mailjet"]
    assert (sg.host, sg.port, sg.tls, sg.username, sg.pool) == (
        "smtp.sendgrid.net",
        587,
        TlsMode.STARTTLS,
        "apikey",
        "default",
    )
    assert (mj.host, mj.port, mj.tls, mj.username) == (
        "in-v3.mailjet.com",
        587,
        TlsMode.STARTTLS,
        "b",
    )
    assert config.orgs == {}
    assert config.relay.attribution.default_org == "default"
    assert config.relay.limits.backend == "memory"
    # An admin API left at its defaults needs no token (it then serves the open endpoints
    # only): no warning (issue 12, finding 8); `admin:` written without a token is warned.
    assert config.warnings == []


def test_relay_yaml_shows_every_default() -> None:
    # config/relay.yaml promises "every key with its default": loading it with all the
    # commented overrides removed must equal the embedded defaults where it says default.
    shipped = load_config(REPO / "config", environ=EXAMPLE_ENV).relay
    defaults = load_config(None, environ=EXAMPLE_ENV).relay
    assert shipped.listeners == defaults.listeners
    assert shipped.clients == defaults.clients
    assert shipped.retry == defaults.retry
    assert shipped.limits == defaults.limits
    assert shipped.attribution == defaults.attribution
    assert shipped.log == defaults.log
    assert (shipped.admin.enabled, shipped.admin.address, shipped.admin.port) == (
        defaults.admin.enabled,
        defaults.admin.address,
        defaults.admin.port,
    )
