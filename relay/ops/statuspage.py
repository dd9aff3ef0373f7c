"""The status page: one server-rendered HTML page from the status document (status.py), with
inline CSS and SVG charts; no JavaScript and nothing loaded from elsewhere. It refreshes
itself every 15 s. The login page asks for the admin token once and leaves a cookie that
only opens the read-only status views."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from html import escape
from typing import Any

from relay.config.units import format_age as age

COOKIE = "relay_status"
REFRESH_SECONDS = 15

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 20px;display:flex;gap:16px;align-items:center}
header h1{font-size:18px;margin:0;font-weight:600}
main{padding:16px 20px;display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px 3px 0;border-bottom:1px solid #eef0f3;vertical-align:top}
th{font-weight:600;color:#5a6272}
td.n,th.n{text-align:right}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ok{background:#d9f2e1;color:#17603a}.warn{background:#fdf0cf;color:#7a5300}
.bad{background:#f9d9d9;color:#8a1c1c}
.big{font-size:24px;font-weight:600}.muted{color:#6b7383}
.stats{display:flex;gap:24px;flex-wrap:wrap}
code{font-size:12px}
"""


def status_cookie(token: str) -> str:
    """The cookie value that opens the status views: derived from the token, never the token."""
    return hmac.new(token.encode(), b"egress-relay status page", hashlib.sha256).hexdigest()


def cookie_valid(token: str | None, value: str | None) -> bool:
    return bool(token and value) and hmac.compare_digest(status_cookie(token or ""), value or "")


def _badge(state: str) -> str:
    cls = {"active": "ok", "ok": "ok", "paused": "warn", "degraded": "warn"}.get(state, "bad")
    return f'<span class="badge {cls}">{escape(state)}</span>'


def _bars(series: Sequence[tuple[str, str, Sequence[int]]], labels: Sequence[str], *,
          title: str, height: int = 120, width: int = 640) -> str:
    """A stacked bar chart in SVG: one bar per label, one colour per series."""
    n = max(1, len(labels))
    totals = [sum(s[2][i] for s in series) for i in range(len(labels))]
    top = max([1, *totals])
    bar = width / n
    parts = [f'<svg role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height + 18}"'
             f' width="100%" preserveAspectRatio="none">']
    for i in range(len(labels)):
        y = float(height)
        for name, colour, values in series:
            h = values[i] / top * height
            if h > 0:
                y -= h
                parts.append(
                    f'<rect x="{i * bar + 1:.1f}" y="{y:.1f}" width="{max(bar - 2, 1):.1f}"'
                    f' height="{h:.1f}" fill="{colour}"><title>{escape(labels[i])}:'
                    f" {values[i]} {escape(name)}</title></rect>"
                )
    step = max(1, n // 6)
    for i in range(0, n, step):
        parts.append(f'<text x="{i * bar:.1f}" y="{height + 14}" font-size="11"'
                     f' fill="#6b7383">{escape(labels[i])}</text>')
    parts.append(f'<text x="{width - 2}" y="11" font-size="11" text-anchor="end"'
                 f' fill="#6b7383">max {top}</text></svg>')
    legend = " ".join(
        f'<span style="color:{c}">&#9632;</span> {escape(name)}' for name, c, _ in series
    )
    return "".join(parts) + f'<div class="muted">{legend}</div>'


def _activity_chart(activity: dict[str, Any]) -> str:
    minutes = activity["minutes"]
    labels = [time.strftime("%H:%M", time.gmtime(m * 60)) for m in minutes]
    per = activity["per_minute"]
    return _bars(
        [("delivered", "#2e9e5b", per["delivered"]), ("deferred", "#e0a100", per["deferred"]),
         ("bounced", "#c0392b", [b + e for b, e in zip(per["bounced"], per["expired"],
                                                         strict=True)])],
        labels, title="recipients per minute, last hour (UTC)",
    )


def _shape_chart(shape: dict[str, Any]) -> str:
    return _bars([("queued messages", "#3b6fd4", shape["total"])], shape["buckets"],
                 title="queued messages by age")


def _health(status: dict[str, Any]) -> tuple[str, list[str]]:
    h = status["health"]
    problems = []
    if not h.get("ready"):
        problems.append("not ready (starting, stopping, or a worker is down)")
    if h.get("unavailable_workers"):
        problems.append(f"workers not answering: {', '.join(map(str, h['unavailable_workers']))}")
    if h.get("limits_backend_degraded"):
        problems.append("the shared limits backend (Redis) is unreachable: local limits apply")
    if h.get("reload_errors"):
        problems.append("the last reload was refused: " + "; ".join(h["reload_errors"]))
    queued = status.get("queue", {}).get("by_upstream", {})
    for u in status.get("upstreams", []):
        if u["state"] != "active" and (u.get("routed_to") or queued.get(u["id"])):
            problems.append(f"upstream {u['id']} {u['state']}: {u.get('reason') or ''}")
    state = "ok" if not problems else ("degraded" if h.get("ready") else "down")
    return state, problems


def render(status: dict[str, Any]) -> str:
    q = status["queue"]
    act = status["activity"]
    hour = {k: sum(v) for k, v in act["per_minute"].items()}
    state, problems = _health(status)
    h = status["health"]
    workers = (f"{h['workers_up']}/{h['workers']} workers up" if "workers" in h
               and isinstance(h["workers"], int) else "1 process")
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>egress-relay {escape(status['hostname'])}: {state}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>egress-relay · {escape(status['hostname'])}</h1>",
        f'<span id="health">{_badge(state)}</span><span>{escape(workers)}</span>',
        f'<span class="muted">as of {time.strftime("%H:%M:%S", time.gmtime(status["generated_at"]))}'
        f" UTC, refreshing every {REFRESH_SECONDS}s</span></header><main>",
    ]
    # health and numbers
    out.append('<section class="wide" id="summary"><h2>Now</h2><div class="stats">')
    for key, label, value in (
        ("queued", "queued messages", q["messages"]),
        ("pending", "recipients pending", q["recipients_pending"]),
        ("held", "held", q["held"]),
        ("oldest", "oldest", age(q.get("oldest_age"))),
        ("delivered", "delivered, last hour", hour.get("delivered", 0)),
        ("deferred", "deferred, last hour", hour.get("deferred", 0)),
        ("bounced", "bounced, last hour", hour.get("bounced", 0) + hour.get("expired", 0)),
    ):
        out.append(f'<div data-stat="{key}"><div class="big">{escape(str(value))}</div>'
                   f'<div class="muted">{escape(label)}</div></div>')
    out.append("</div>")
    if problems:
        out.append('<ul id="problems">' + "".join(f"<li>{escape(p)}</li>" for p in problems)
                   + "</ul>")
    out.append("</section>")
    # charts
    out.append('<section id="activity"><h2>Recipients per minute, last hour</h2>'
               f"{_activity_chart(act)}</section>")
    out.append(f'<section id="ages"><h2>Queue by age</h2>{_shape_chart(status["shape"])}</section>')
    # upstreams
    out.append('<section class="wide" id="upstreams"><h2>Upstreams</h2><table><tr><th>upstream'
               '</th><th>server</th><th>pool</th><th>state</th><th class=n>queued</th>'
               '<th class=n>oldest</th><th class=n>in flight</th><th>limits</th><th>why</th></tr>')
    by_up = q.get("by_upstream", {})
    for u in status["upstreams"]:
        g = by_up.get(u["id"], {})
        limits = ", ".join(f"{k} {v}" for k, v in u["limits"].items()) or "-"
        if u.get("use"):
            limits += "; now " + ", ".join(u["use"])
        out.append(
            f"<tr><td>{escape(u['id'])}</td><td><code>{escape(u['host'])}:{u['port']}"
            f" ({escape(u['tls'])})</code></td><td>{escape(u['pool'])}</td>"
            f"<td>{_badge(u['state'])}</td><td class=n>{g.get('messages', 0)}</td>"
            f"<td class=n>{age(g.get('oldest_age'))}</td><td class=n>{u['in_flight']}</td>"
            f"<td>{escape(limits)}</td><td>{escape(u.get('reason') or '')}</td></tr>"
        )
    out.append("</table></section>")
    # why mail waits
    out.append('<section class="wide" id="waiting"><h2>Why mail waits</h2><table><tr>'
               '<th class=n>messages</th><th>reason</th><th>upstream</th><th>why</th></tr>')
    for w in status.get("waiting", []):
        out.append(f"<tr><td class=n>{w['messages']}</td><td>{escape(w['kind'])}</td>"
                   f"<td>{escape(w.get('upstream') or '-')}</td>"
                   f"<td>{escape(w['reason'])}</td></tr>")
    if not status.get("waiting"):
        out.append('<tr><td colspan=4 class="muted">nothing is waiting</td></tr>')
    out.append("</table></section>")
    # organisations
    out.append('<section id="orgs"><h2>Queue by organisation</h2><table><tr><th>organisation'
               '</th><th class=n>messages</th><th class=n>recipients</th><th class=n>held</th>'
               '<th class=n>oldest</th></tr>')
    for name, g in sorted(q.get("by_org", {}).items(), key=lambda x: -x[1]["messages"]):
        out.append(f"<tr><td>{escape(name)}</td><td class=n>{g['messages']}</td><td class=n>"
                   f"{g['recipients_pending']}</td><td class=n>{g['held']}</td>"
                   f"<td class=n>{age(g.get('oldest_age'))}</td></tr>")
    out.append("</table></section>")
    # egress
    eg = status["egress"]
    out.append('<section id="egress"><h2>Published egress addresses</h2><table>'
               "<tr><th>pool</th><th>addresses</th></tr>")
    for pool, p in eg.get("pools", {}).items():
        addrs = ", ".join(s["address"] if isinstance(s, dict) else str(s)
                          for s in (p.get("sources", []) if isinstance(p, dict) else p))
        out.append(f"<tr><td>{escape(pool)}</td><td><code>{escape(addrs)}</code></td></tr>")
    out.append("</table></section>")
    # recent failures
    out.append('<section class="wide" id="recent"><h2>Latest deferrals and bounces</h2><table>'
               "<tr><th>time (UTC)</th><th>what</th><th>queue id</th><th>upstream</th>"
               "<th>recipient</th><th>the upstream's reply</th></tr>")
    for r in act["recent"][:20]:
        out.append(
            f"<tr><td>{time.strftime('%H:%M:%S', time.gmtime(r['ts']))}</td>"
            f"<td>{escape(r['event'])}</td><td><code>{escape(str(r.get('queue_id', '')))}</code>"
            f"</td><td>{escape(str(r.get('upstream', '')))}</td>"
            f"<td>{escape(str(r.get('recipient', '')))}</td>"
            f"<td><code>{escape(str(r.get('reply', '')))}</code></td></tr>"
        )
    if not act["recent"]:
        out.append('<tr><td colspan=6 class="muted">none since the relay started</td></tr>')
    out.append("</table></section></main></body></html>")
    return "\n".join(out)


def login_page(message: str = "") -> str:
    note = f'<p class="badge bad">{escape(message)}</p>' if message else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>egress-relay status"
        f"</title><style>{_CSS}</style></head><body><header><h1>egress-relay status</h1>"
        '</header><main><section><h2>Admin token</h2><form method="post" action="/status/login">'
        f'{note}<p><input type="password" name="token" autocomplete="current-password" size=40'
        ' autofocus> <button type="submit">Show status</button></p><p class="muted">The token'
        " of <code>admin.token</code>; a cookie derived from it then opens this read-only page."
        "</p></form></section></main></body></html>"
    )
