"""Read `relay.yaml` and `policies/*.yaml` from disk and return a validated `Config`.

`load_config` either returns a complete Config or raises ConfigErrors listing every problem
as `file:line: message`; it never binds a port or starts anything, so `relay check` and
reload both use it unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from relay.config.build import Builder
from relay.config.errors import ConfigError, ConfigErrors
from relay.config.files import check_files
from relay.config.model import Config
from relay.config.schema import OrgConf, RelayConf
from relay.config.yamlsrc import Located, load_yaml

M = TypeVar("M", bound=BaseModel)
CONFIG_NAME = "relay.yaml"


def _validate(model: type[M], src: Located) -> tuple[M | None, list[ConfigError]]:
    value = src.value if src.value is not None else {}
    if not isinstance(value, dict):
        return None, [ConfigError(src.file, 1, "the file must be a mapping of keys to values")]
    try:
        return model.model_validate(value), []
    except ValidationError as exc:
        errors = []
        for e in exc.errors(include_url=False):
            loc = tuple(p for p in e["loc"] if p != "[key]")
            where = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc)
            where = where.replace(".[", "[")
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            errors.append(
                ConfigError(src.file, src.line_of(loc), f"{where}: {msg}" if where else msg)
            )
        return None, errors


def _read(path: Path) -> tuple[Located, list[ConfigError]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return Located(str(path), None), [
            ConfigError(str(path), 1, f"cannot read: {getattr(exc, 'strerror', None) or exc}")
        ]
    return load_yaml(text, str(path))


def find_config_file(location: str | Path) -> Path:
    """`-c` takes a directory holding relay.yaml or the file itself."""
    p = Path(location)
    return p / CONFIG_NAME if p.is_dir() else p


def load_config(location: str | Path | None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Load and check everything. None means the embedded defaults (no files at all)."""
    errors: list[ConfigError] = []
    if location is None:
        rsrc = Located("<defaults>", {}, {(): 1})
        base_dir = Path.cwd()
    else:
        file = find_config_file(location)
        base_dir = file.parent
        rsrc, errs = _read(file)
        errors += errs
        if errs and rsrc.value is None:
            # Unreadable or not YAML at all: validating defaults in its place would only add
            # errors that are not the admin's (e.g. policies naming pools the file defines).
            raise ConfigErrors(errors)
    relay, errs = _validate(RelayConf, rsrc)
    errors += errs
    orgs: list[tuple[OrgConf, Located]] = []
    if location is not None:
        # Policy files are checked even when relay.yaml is invalid: every error at once.
        orgs, errs = _load_policies(rsrc, relay, base_dir)
        errors += errs
    if relay is None:
        raise ConfigErrors(errors)
    builder = Builder(environ)
    config = builder.build(relay, rsrc, orgs, base_dir)
    errors += builder.errors
    if location is not None:
        errors += check_files(relay, rsrc, base_dir)  # every file the relay will open
    if errors or config is None:
        raise ConfigErrors(errors)
    return config


def _load_policies(
    rsrc: Located, relay: RelayConf | None, base_dir: Path
) -> tuple[list[tuple[OrgConf, Located]], list[ConfigError]]:
    errors: list[ConfigError] = []
    orgs: list[tuple[OrgConf, Located]] = []
    raw = rsrc.value if isinstance(rsrc.value, dict) else {}
    if relay is not None:
        where = relay.policies
    elif isinstance(raw.get("policies", "policies"), str):
        where = raw.get("policies", "policies")
    else:
        return orgs, errors  # the schema error on `policies:` is already reported
    pdir = Path(where)
    pdir = pdir if pdir.is_absolute() else Path(os.path.normpath(base_dir / pdir))
    if pdir.is_dir():
        for pfile in sorted([*pdir.glob("*.yaml"), *pdir.glob("*.yml")]):
            psrc, errs = _read(pfile)
            errors += errs
            if psrc.value is None:
                continue
            org, errs = _validate(OrgConf, psrc)
            errors += errs
            if org is not None:
                orgs.append((org, psrc))
    elif "policies" in raw:
        errors.append(
            ConfigError(
                rsrc.file,
                rsrc.line_of(("policies",)),
                f"policies directory {pdir} does not exist",
            )
        )
    return orgs, errors


def effective(config: Config) -> dict[str, Any]:
    """The effective configuration for the start-up log (secrets shown as their references)."""
    return config.relay.model_dump(mode="json")
