"""The report as text: one plain HTML page for a browser, one table for a terminal.

No JavaScript and no external assets. The page is two tables that read on a laptop
and, scrolled sideways inside their box, on a phone.
"""

from __future__ import annotations

import html
import time

from gateway.insight.report import OLD_LOCK_AFTER, STALE_AFTER, Report, RepositoryStatus

WARNING = "\u26a0"  # the mark of a repository that needs a look


def age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def size(value: int | None) -> str:
    if value is None:
        return "unknown"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def since(now: float, at: float | None) -> str:
    return "never" if at is None else age(now - at) + " ago"


def warnings(repo: RepositoryStatus) -> list[str]:
    found = []
    if repo.stale:
        found.append(f"no snapshot in {STALE_AFTER / 3600:.0f} h")
    if repo.old_lock:
        found.append(f"lock older than {OLD_LOCK_AFTER / 3600:.0f} h")
    if repo.quota_level >= 100:
        found.append("quota full")
    elif repo.quota_level:
        found.append(f"over {repo.quota_level} % of quota")
    return found


def quota_cell(repo: RepositoryStatus) -> str:
    if repo.quota_bytes is None:
        return "-"
    if repo.quota_used_bytes is None:
        return f"? of {size(repo.quota_bytes)}"
    percent = repo.quota_used_bytes * 100 // max(repo.quota_bytes, 1)
    return f"{percent} % of {size(repo.quota_bytes)}"


COLUMNS = ["module", "last snapshot", "warning", "stored", "quota", "lock age", "last restore",
           "destination"]


def repository_row(repo: RepositoryStatus, now: float,
                   names: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "module": repo.module or repo.uuid,
        "destination": (names or {}).get(repo.destination) or repo.destination,
        "last snapshot": since(now, repo.last_snapshot_at),
        "stored": size(repo.stored_bytes),
        "quota": quota_cell(repo),
        "lock age": age(repo.oldest_lock_age) if repo.locks else "-",
        "last restore": since(now, repo.last_restore_at),
        "warning": "; ".join(warnings(repo)),
    }


_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:1rem;color:#222;background:#fff}
h1{font-size:1.3rem;margin:0 0 .2rem}h2{font-size:1.1rem;margin:1.4rem 0 .4rem}
p{margin:.2rem 0;color:#555}.box{overflow-x:auto}
table{border-collapse:collapse;min-width:100%}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #ddd;white-space:nowrap}
@media (max-width:600px){body{font-size:14px;margin:.5rem}th,td{padding:.3rem .4rem}}
th{background:#f3f3f3}td.num{text-align:right}
tr.warn td{background:#fff4e0}.mark{color:#b35c00;font-weight:bold}
code{font-size:.9em}
"""


def html_page(report: Report) -> str:
    now = report.generated_at
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Backups on node {e(report.node_id)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Backups on node {e(report.node_id)}</h1>",
        f"<p>As of {e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now)))}; "
        f"storage last listed {e(since(now, report.last_scan_at))}.</p>",
        "<h2>Repositories served here</h2>",
    ]
    names = {d.uuid: d.name for d in report.destinations if d.name}
    if report.repositories:
        columns = COLUMNS
        out.append('<div class="box"><table><thead><tr>'
                   + "".join(f"<th>{c}</th>" for c in columns) + "</tr></thead><tbody>")
        for repo in report.repositories:
            row = repository_row(repo, now, names)
            flagged = bool(row["warning"])
            cells = []
            for column in columns:
                value = e(row[column])
                if column == "warning" and flagged:
                    value = f'<span class="mark">{WARNING} {value}</span>'
                if column == "destination":
                    value = f'<span title="{e(repo.destination)}">{value}</span>'
                cls = ' class="num"' if column in ("stored", "quota") else ""
                cells.append(f"<td{cls}>{value}</td>")
            out.append(('<tr class="warn">' if flagged else "<tr>") + "".join(cells) + "</tr>")
        out.append("</tbody></table></div>")
    else:
        out.append("<p>No repository is served here.</p>")
    out.append("<h2>Destinations</h2>")
    out.append('<div class="box"><table><thead><tr><th>name</th><th>health</th><th>free</th>'
               "<th>total</th><th>provider</th><th>uuid</th></tr></thead><tbody>")
    for dest in report.destinations:
        if dest.served == "here":
            health = e(dest.state)
        elif dest.served == "peer" and dest.peer and dest.peer_address:
            address = dest.peer_address
            host = f"[{address}]" if ":" in address else address
            health = (f'served by <a href="http://{e(host)}:4694/status">{e(dest.peer)}</a>'
                      f" ({e(address)})")
        else:
            health = "not served"
        out.append(
            f"<tr><td>{e(dest.name or '-')}</td><td>{health}</td>"
            f'<td class="num">{e(size(dest.free_bytes))}</td>'
            f'<td class="num">{e(size(dest.total_bytes))}</td>'
            f"<td>{e(dest.provider)}</td><td><code>{e(dest.uuid)}</code></td></tr>")
    out.append("</tbody></table></div></body></html>")
    return "\n".join(out)


def text_table(report: Report) -> str:
    """The repositories as a plain table for a terminal."""
    now = report.generated_at
    columns = COLUMNS
    names = {d.uuid: d.name for d in report.destinations if d.name}
    rows = [repository_row(r, now, names) for r in report.repositories]
    for row in rows:
        if row["warning"]:
            row["warning"] = f"{WARNING} {row['warning']}"
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for row in rows:
        lines.append("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
    if not rows:
        lines.append("(no repository served here)")
    lines.append("")
    lines.append("DESTINATION  PROVIDER  HEALTH  FREE  TOTAL")
    for dest in report.destinations:
        health = dest.state if dest.served == "here" else (
            f"served by {dest.peer}" if dest.peer else "not served")
        lines.append(f"{dest.uuid[:8]}  {dest.provider}  {health}  {size(dest.free_bytes)}  "
                     f"{size(dest.total_bytes)}")
    return "\n".join(lines) + "\n"
