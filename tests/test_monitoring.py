"""The Prometheus alert rules and the Grafana dashboard, checked against the real thing:
promtool validates the rules and runs their unit tests, and every metric the rules and the
dashboard query is one a running relay (with workers) really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import yaml

from tests.adminapi import ENV, admin_url, relay_with_admin
from tests.relayproc import RelayProcess, plain_upstream
from tests.sinks import ThreadedSink

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitoring" / "prometheus" / "egress-relay.rules.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "egress-relay.tests.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "egress-relay.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# Names Prometheus itself provides, not the relay.
BUILTIN = {"up", "ALERTS"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
_FUNCTIONS_AND_WORDS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right|and|or|"
                                  r"unless|bool|offset)\b")


def _exported(text: str) -> set[str]:
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        base = family.removesuffix("_total") if kind == "counter" else family
        names.update(base + s for s in SUFFIXES.get(kind, ("",)))
    return names


def _metrics_in(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = _FUNCTIONS_AND_WORDS.sub(" ", expr)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?!\s*\()", expr))
    return {w for w in words if w.startswith("relay_") or w in BUILTIN}


def _queries() -> dict[str, str]:
    out = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out[f"rule {rule['alert']}"] = rule["expr"]
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for t in panel["targets"]:
            out[f"panel {panel['title']} {t['refId']}"] = t["expr"]
    for a in dash["annotations"]["list"]:
        out[f"annotation {a['name']}"] = a["expr"]
    return out


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True,
                         text=True, cwd=RULE_TESTS.parent)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    defined = {q.split()[1] for q in _queries() if q.startswith("rule ")}
    assert defined <= tested, f"alerts without a unit test: {sorted(defined - tested)}"


def test_every_alert_has_a_runbook_section() -> None:
    text = RUNBOOKS.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^## (.+)$", text, re.M)}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            a = rule["annotations"]
            assert a["summary"] and a["description"] and a["runbook"], rule["alert"]
            assert a["runbook_url"] == f"docs/runbooks.md#{rule['alert'].lower()}"
            assert rule["alert"].lower() in anchors, f"no '## {rule['alert']}' in {RUNBOOKS}"


def test_the_dashboard_and_rules_query_only_metrics_the_relay_exports(tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "egress-relay" and dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert all(p["targets"] for p in dash["panels"])
    with ThreadedSink() as sink:
        cfg = relay_with_admin(tmp_path / "relay", upstreams={"s": plain_upstream(sink.port)},
                               default_upstream="s", workers=2).write()
        with RelayProcess(cfg, env=ENV) as relay:
            with urllib.request.urlopen(f"{admin_url(relay)}/metrics", timeout=30) as resp:
                exported = _exported(resp.read().decode()) | BUILTIN
    unknown = {where: sorted(_metrics_in(e) - exported) for where, e in _queries().items()
               if _metrics_in(e) - exported}
    assert unknown == {}
    used = set().union(*(_metrics_in(e) for e in _queries().values()))
    assert {"relay_queue_oldest_age_seconds", "relay_recipients_total", "relay_workers_up",
            "relay_spool_filesystem_avail_bytes"} <= used
