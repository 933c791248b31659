"""``hedwig-tasks inspect``: the app's live workers and what each is running, from their heartbeat rows.

Each worker writes its row in the state store every few seconds (see
:mod:`hedwig_tasks._worker_heartbeat`); a row not written for three intervals has expired, so
only live workers show. ``--json`` prints the rows as they are stored, plus ``worker`` and
``last_seen``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from hedwig_tasks._worker_heartbeat import group
from hedwig_tasks.state.base import Member

__all__ = ["add_inspect_command", "inspect_lines"]


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def inspect_lines(members: list[Member], now: float) -> list[str]:
    """The ``inspect`` table: a line per worker, then one per message it is running."""
    lines = [
        f"{'worker':34} {'version':8} {'pool':12} {'held':>5} {'running':>7} {'handled':>8} "
        f"{'failed':>7} {'dup':>5} {'up':>8} {'seen':>7}"
    ]
    for member in members:
        row = member.data
        pool = f"{row.get('pool', '?')} x{row.get('concurrency', '?')}"
        running = row.get("running", [])
        lines.append(
            f"{member.member:34} {row.get('version', '?'):8} {pool:12} {row.get('held', 0):>5} {len(running):>7} "
            f"{row.get('handled', 0):>8} {row.get('failed', 0):>7} {row.get('duplicates', 0):>5} "
            f"{_ago(now - row.get('started', now)):>8} {_ago(now - member.seen):>7}"
        )
        lines.append(f"  {row.get('transport', '?')}  topics: {', '.join(row.get('topics', []))}")
        lines += [f"  running {m['type']} id={m['id']} for {_ago(now - m['since'])}" for m in running]
    if not members:
        lines.append("(no live workers: none has written a heartbeat row in this state store lately)")
    return lines


def cmd_inspect(args: argparse.Namespace, app: Any) -> int:
    if args.state:
        app._state_spec, app._state = args.state, None
    store = app.state
    members, now = store.members(group(app.name)), store.now()
    if args.json:
        rows = [{"worker": m.member, "last_seen": m.seen, **m.data} for m in members]
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        print("\n".join(inspect_lines(members, now)))
    return 0


def add_inspect_command(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``inspect`` to the CLI's subcommands."""
    inspect = commands.add_parser("inspect", help="list the app's live workers and what each is running")
    common(inspect)
    inspect.add_argument("--json", action="store_true", help="print the workers' rows as JSON")
    inspect.add_argument("--state", metavar="URL", help="override the app's state store URL")
    inspect.set_defaults(func=cmd_inspect)
