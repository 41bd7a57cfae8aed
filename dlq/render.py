"""Tables for people (rich): the inspect summary and the replay summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text


def _counts(title: str, header: str, counts: dict[str, int], total: int) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False)
    t.add_column(header)
    t.add_column("records", justify="right")
    t.add_column("share", justify="right")
    for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        t.add_row(key, str(n), f"{n / total:.0%}" if total else "-")
    return t


def inspect_view(s: dict[str, Any]) -> RenderableType:
    total = int(s["records"])
    head = Text.assemble(
        ("DLQ ", "bold"), (str(s["topic"]), "bold cyan"),
        f": {total} record(s)",
        f" of {s['scanned']} scanned, filter {s['filter']}" if s["filter"] else "",
        f", {s['distinct_origins']} distinct original record(s)",
        f"\nfirst failure {s['first_failure'] or '-'}, last failure {s['last_failure'] or '-'}",
    )
    origin = {f"{topic} [{part}]": n for topic, parts in s["by_origin"].items() for part, n in parts.items()}
    parts: list[RenderableType] = [
        head,
        _counts("by error class", "error class", s["by_error_class"], total),
        _counts("by stage", "stage", s["by_stage"], total),
        _counts("by origin", "topic [partition]", origin, total),
        _counts("by attempt", "attempt", s["by_attempt"], total),
    ]
    if s["examples"]:
        ex = Table(title="examples", title_justify="left", show_edge=False, show_lines=True)
        for col in ("dlq p/offset", "error", "original", "key", "value", "headers"):
            ex.add_column(col, overflow="fold")
        for e in s["examples"]:
            o = e["original"]
            ours = {k: v for k, v in e["headers"].items() if k.startswith(("__connect.errors.", "__sink."))}
            theirs = {k: v for k, v in e["headers"].items() if k not in ours}
            ex.add_row(
                f"{e['partition']}/{e['offset']}",
                f"{e['stage']}: {e['error_class']}\n{e['message'] or ''}\nat {e['failed_at']}, attempt {e['attempt']}",
                f"{o['topic']} [{o['partition']}] @{o['offset']}",
                Text(str(e["key"])),
                Text(f"{e['value']}\n({e['value_bytes']} bytes)"),
                Text("\n".join(f"{k}={v}" for k, v in theirs.items()) or "-"),
            )
        parts.append(ex)
    return Group(*parts)


def replay_view(summary: dict[str, Any]) -> RenderableType:
    c = summary["counts"]
    t = Table(title=f"DLQ replay: {summary['outcome']}" + (" (dry run)" if summary["dry_run"] else ""),
              title_justify="left", show_edge=False, show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    rows = [("replayed", c["replayed"])]
    if summary["dry_run"]:
        rows.append(("valid (would be written)", c["valid"]))
    elif summary["to_topic"]:
        rows.append((f"re-published to {summary['to_topic']}", c["republished"]))
    else:
        rows += [("inserted", c["inserted"]), ("updated", c["updated"]), ("already present", c["already_present"])]
    rows += [("failed again", c["failed_again"]), ("  written back to the DLQ", c["dlq"]),
             ("skipped (filter)", c["skipped"])]
    for name, n in rows:
        t.add_row(name, str(n))
    lines: list[RenderableType] = [t]
    if summary.get("markers") is not None:
        # The progress counts offsets: say why they are more than the records.
        records = c["replayed"] + c["skipped"]
        lines.append(Text(f"{summary['offsets']} DLQ offsets read: {records} records and {summary['markers']} "
                          "Kafka transaction markers (not records)", style="dim"))
    lines.append(Text(f"group {summary['group']}, DLQ {summary['topic']}", style="dim"))
    if summary.get("stopped_at"):
        s = summary["stopped_at"]
        lines.append(Text(f"stopped at DLQ partition {s['partition']} offset {s['offset']}: "
                          f"{s['stage']}: {s['error_class']}: {s['reason']}", style="yellow"))
    if summary.get("error"):
        lines.append(Text(f"error: {summary['error']}", style="red"))
    return Group(*lines)


def show(renderable: RenderableType, console: Console | None = None) -> None:
    (console or Console()).print(renderable)
