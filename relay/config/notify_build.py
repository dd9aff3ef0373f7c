"""Cross-file checks of the notification settings (webhooks, DSN upstream, DSNs off), as
`file:line: message` errors and warnings through the builder of `relay.config.build`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from relay.config.notify import WebhookConf
from relay.config.schema import OrgConf, RelayConf
from relay.config.secrets import SecretUnavailable, resolve_secret
from relay.config.yamlsrc import Located
from relay.config.yamlsrc import Path as YPath


class Reporter(Protocol):
    environ: Mapping[str, str]

    def err(self, src: Located, path: YPath, message: str) -> None: ...
    def warn(self, src: Located, path: YPath, message: str) -> None: ...


def _webhooks(b: Reporter, hooks: Mapping[str, WebhookConf], src: Located, where: str,
              base_dir: Path) -> None:
    for name, hook in hooks.items():
        path: YPath = ("webhooks", name)
        try:
            resolve_secret(hook.secret, base_dir=base_dir, environ=b.environ)
        except SecretUnavailable as exc:
            b.warn(src, (*path, "secret"),
                   f"webhook '{where}{name}': {exc}; its events wait in the outbox")
        if hook.ca_file and not (base_dir / hook.ca_file).exists():
            b.err(src, (*path, "ca_file"), f"webhook '{where}{name}': ca_file {hook.ca_file}"
                  " does not exist")
        if not hook.verify_tls:
            b.warn(src, (*path, "verify_tls"),
                   f"webhook '{where}{name}': TLS certificate verification is OFF")
        if hook.retry_max < hook.retry_initial:
            b.err(src, (*path, "retry_max"), f"webhook '{where}{name}': retry_max is below"
                  " retry_initial")


def check_relay_notify(b: Reporter, relay: RelayConf, src: Located,
                       upstreams: Mapping[str, object], base_dir: Path) -> str | None:
    """relay.yaml's webhooks and dsn; returns the DSN upstream id when one is set."""
    _webhooks(b, relay.webhooks, src, "", base_dir)
    up = relay.dsn.upstream
    if up is not None and up not in upstreams:
        b.err(src, ("dsn", "upstream"), f"dsn upstream '{up}' is not defined")
    return up


def check_org_notify(b: Reporter, oc: OrgConf, src: Located, relay: RelayConf,
                     base_dir: Path) -> None:
    _webhooks(b, oc.webhooks, src, f"{oc.org}/", base_dir)
    if not oc.dsn.enabled and not oc.webhooks and not relay.webhooks:
        b.err(src, ("dsn", "enabled"),
              f"organisation '{oc.org}': DSNs can only be turned off when a webhook receives"
              " its events (webhooks here or in relay.yaml); otherwise nobody would learn of"
              " its bounces")
