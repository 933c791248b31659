"""``hedwig-tasks beat``: publish the app's periodic schedules; ``--list`` shows when each runs next.

Any number of beats may run for one app: one leads (a lease in the state store) and the
others wait to take over (see :mod:`hedwig_tasks.beat`). SIGTERM or SIGINT stops a beat,
releasing its lease so another takes over at once; exit 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from hedwig_tasks._cli_app import CLIError
from hedwig_tasks.beat import DEFAULT_LEASE_S, Beat, BeatOptions, ScheduleRow

__all__ = ["add_beat_command", "plan_lines"]

logger = logging.getLogger("hedwig_tasks")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def plan_lines(rows: list[ScheduleRow]) -> list[str]:
    """The ``beat --list`` table: one line per schedule, its next run and last recorded tick."""
    lines = [f"{'schedule':24} {'message':24} {'when':36} {'next run':23}  last published"]
    for row in rows:
        s = row.schedule
        lines.append(
            f"{s.name:24} {s.message_type + ' ' + s.version:24} {s.describe():36} "
            f"{_when(row.next_run):23}  {_when(row.last_tick)}"
        )
    if not rows:
        lines.append("(no schedules: declare one with @hedwig.periodic(...) in the module -A names)")
    return lines


def cmd_beat(args: argparse.Namespace, app: Any) -> int:
    if args.state:
        app._state_spec, app._state = args.state, None
    beat = Beat(app, options=BeatOptions(lease_s=args.lease))
    if args.list:
        print("\n".join(plan_lines(beat.plan())))
        return 0
    if not beat.schedules:
        raise CLIError(f"{app.name!r} has no periodic schedules: declare one with @hedwig.periodic(...)")

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("%s: releasing the lease and stopping", signal.Signals(signum).name)
        beat.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    beat.run()
    return 0


def add_beat_command(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``beat`` to the CLI's subcommands."""
    beat = commands.add_parser("beat", help="publish the app's periodic schedules (any number may run)")
    common(beat)
    beat.add_argument("--list", action="store_true", help="show each schedule's next run and exit")
    beat.add_argument("--state", metavar="URL", help="override the app's state store URL")
    beat.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE_S,
        metavar="SECONDS",
        help="how long the leader lease lasts unrenewed: a dead leader is replaced within it (%(default)s)",
    )
    beat.set_defaults(func=cmd_beat)
