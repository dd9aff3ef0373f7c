"""Which upstreams the routing can reach, and where the configuration says so: warnings
about an upstream (its credential cannot be resolved) are only worth saying for an upstream
that mail can go to, at the line that sends mail there (relay/policy/routing.py's order:
`default_upstream`, an organisation's `upstream`, a member's `upstream`). The built-in
presets exist in every configuration; one that nothing routes to needs no credential.
"""

from __future__ import annotations

from relay.config.errors import ConfigError
from relay.config.schema import OrgConf, RelayConf
from relay.config.yamlsrc import Located
from relay.config.yamlsrc import Path as YPath

# upstream id -> (file, path of the key that routes to it, who routes there)
Uses = dict[str, tuple[Located, YPath, str]]


def first_uses(
    relay: RelayConf, rsrc: Located, orgs: list[tuple[OrgConf, Located]], default_upstream: str
) -> Uses:
    uses: Uses = {}
    if relay.default_upstream:
        uses[relay.default_upstream] = (rsrc, ("default_upstream",), "default_upstream")
    else:
        uses[default_upstream] = (rsrc, (), "default_upstream, which is not set")
    for oc, src in orgs:

        def uid(name: str, oc: OrgConf = oc) -> str:
            return f"{oc.org}/{name}" if name in oc.upstreams else name

        if oc.upstream:
            uses.setdefault(uid(oc.upstream), (src, ("upstream",), f"organisation '{oc.org}'"))
        for addr, mc in oc.members.items():
            if mc.upstream:
                where: YPath = ("members", addr, "upstream")
                uses.setdefault(uid(mc.upstream), (src, where, f"account '{addr}'"))
        for name, uc in oc.upstreams.items():  # `previous:` carries mail until verification
            if uc.verify and uc.previous:
                uses.setdefault(uid(uc.previous), (src, ("upstreams", name, "previous"),
                                                   f"upstream '{oc.org}/{name}' until it is verified"))
    for name, uc in relay.upstreams.items():
        if uc.verify and uc.previous:
            uses.setdefault(uc.previous, (rsrc, ("upstreams", name, "previous"),
                                          f"upstream '{name}' until it is verified"))
    return uses


def unresolved_warnings(unresolved: dict[str, str], uses: Uses) -> list[ConfigError]:
    """One warning per used upstream whose credential is missing (`unresolved`: id -> why),
    at the line that routes mail to it."""
    out = []
    for uid, why in unresolved.items():
        use = uses.get(uid)
        if use is None:
            continue  # nothing routes there: no mail can wait for it
        src, path, who = use
        out.append(
            ConfigError(
                src.file,
                src.line_of(path),
                f"upstream '{uid}' (used by {who}): {why}; its mail will wait in the queue",
            )
        )
    return out
