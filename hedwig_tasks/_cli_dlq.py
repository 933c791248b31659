"""``hedwig-tasks dlq``: list, show, requeue and purge an app's dead letters.

``list`` prints a table (``--json`` for JSON lines) and says how many exist; ``list``,
``requeue`` and ``purge`` take the same filters (subscription, type, reason text, age).
``requeue`` and ``purge`` say what they are about to do and ask first (``--yes`` skips the
question), then report their progress on stderr as they go.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from hedwig_tasks._cli_app import CLIError
from hedwig_tasks.app import Hedwig
from hedwig_tasks.transports.base import DeadLetterRecord

__all__ = ["add_dlq_commands", "as_json", "dead_letter_total", "parse_age", "record_filters", "type_and_version"]

#: Dead letters ``list`` shows unless ``--limit`` says otherwise.
DEFAULT_LIST_LIMIT = 100
#: Most dead letters read to apply filters, unless ``--scan`` says otherwise.
DEFAULT_SCAN = 10_000
#: Seconds between progress lines when stderr is not a terminal.
PROGRESS_EVERY_S = 1.0

EXIT_DECLINED = 1

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_age(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``2h``, ``3d`` or ``1w``; ``ArgumentTypeError`` otherwise."""
    match = _AGE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: use a number and s, m, h, d or w, such as 2h")
    return float(match[1]) * _UNIT_S[match[2]]


# -- what a record says -----------------------------------------------------------------------


def _schema(record: DeadLetterRecord) -> str:
    schema = record.attributes.get("hedwig_schema", "")
    if not schema and record.body[:1] == b"{":  # Hedwig's container form carries it in the body
        try:
            schema = str(json.loads(record.body).get("schema", ""))
        except (ValueError, AttributeError):
            schema = ""
    return schema


def type_and_version(record: DeadLetterRecord) -> tuple[str, str]:
    """``(type, version)`` from the schema the message names; ``("?", "?")`` when it names none."""
    schema = _schema(record).rpartition("#/schemas/")[2]
    message_type, _, version = schema.rpartition("/")
    return (message_type or "?", version or "?")


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _body(record: DeadLetterRecord) -> dict[str, str]:
    try:
        return {"body": record.body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(record.body).decode("ascii")}


def as_json(record: DeadLetterRecord) -> dict[str, Any]:
    """Every field of ``record``, for ``--json``."""
    message_type, version = type_and_version(record)
    return {
        "id": record.transport_id,
        "hedwig_id": record.attributes.get("hedwig_id", ""),
        "type": message_type,
        "version": version,
        "subscription": record.subscription,
        "attempts": record.attempts,
        "dead_at": _when(record.dead_at) + "Z",
        "reason": record.reason,
        "attributes": dict(record.attributes),
        **_body(record),
    }


# -- filters ----------------------------------------------------------------------------------


def record_filters(args: argparse.Namespace) -> list[Callable[[DeadLetterRecord], bool]]:
    """A test per filter option given (subscription, type, reason, age); a record must pass all.

    Also the dashboard's, which fills the same namespace from its query string.
    """
    now = time.time()
    tests: list[Callable[[DeadLetterRecord], bool]] = []
    if args.subscription:
        tests.append(lambda r: args.subscription in r.subscription)
    if args.type:
        tests.append(lambda r: type_and_version(r)[0] == args.type)
    if args.reason:
        tests.append(lambda r: args.reason.lower() in r.reason.lower())
    if args.older_than is not None:
        tests.append(lambda r: r.dead_at <= now - args.older_than)
    if args.newer_than is not None:
        tests.append(lambda r: r.dead_at > now - args.newer_than)
    return tests


def dead_letter_total(app: Hedwig) -> int | None:
    """How many dead letters the app has, as cheaply as the transport counts them; None if unknown."""
    rows = app.transport.counts(app.queue, app.subscribed_topics())
    counts = [row.dead_letters for row in rows]
    return None if not rows or None in counts else sum(c for c in counts if c is not None)


def _select(args: argparse.Namespace, app: Hedwig, limit: int) -> tuple[list[DeadLetterRecord], int]:
    """Up to ``limit`` records that pass the filters and ids, and how many were read to find them."""
    tests = record_filters(args)
    ids = getattr(args, "ids", None) or None
    if not tests:
        records = app.transport.dead_letters(app.queue, limit=limit, ids=ids)
        return records, len(records)
    read = app.transport.dead_letters(app.queue, limit=max(args.scan, limit), ids=ids)
    return [r for r in read if all(test(r) for test in tests)][:limit], len(read)


# -- list and show ----------------------------------------------------------------------------


def _table(records: Sequence[DeadLetterRecord]) -> list[str]:
    header = ("id", "type", "version", "subscription", "attempts", "died (UTC)", "reason")
    rows = [
        (r.transport_id, *type_and_version(r), r.subscription, str(r.attempts), _when(r.dead_at), r.reason)
        for r in records
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    room = max(30, shutil.get_terminal_size((120, 24)).columns - sum(widths) - 2 * len(widths))
    lines = []
    for row in [header, *rows]:
        reason = " ".join(row[-1].split())
        reason = reason if len(reason) <= room else reason[: room - 3] + "..."
        cells = [
            cell.rjust(width) if i == 4 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join([*cells, reason]).rstrip())
    return lines


def _footer(app: Hedwig, shown: int, read: int, filtered: bool, limit: int) -> str:
    total = dead_letter_total(app)
    if total is None and not filtered and read < limit:  # uncounted, but fewer than asked came back: all
        total = read
    of = f"{total:,}" if total is not None else "an unknown number of"
    if filtered:
        scanned = f"the oldest {read:,} read" if total is None or read < total else f"all {read:,} read"
        return f"{shown:,} matching dead letter(s) shown ({scanned}; {of} in all)"
    more = " (--limit N for more)" if total is None or total > shown else ""
    return f"{shown:,} of {of} dead letter(s) of {app.queue} shown, oldest first{more}"


def cmd_list(args: argparse.Namespace, app: Hedwig) -> int:
    records, read = _select(args, app, args.limit)
    if args.json:
        for record in records:
            print(json.dumps(as_json(record)))
    elif records:
        print("\n".join(_table(records)))
    print(_footer(app, len(records), read, bool(record_filters(args)), args.limit), file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace, app: Hedwig) -> int:
    found = app.transport.dead_letters(app.queue, limit=1, ids=[args.id])
    if not found:
        raise CLIError(f"no dead letter of {app.queue} has id {args.id!r}; `hedwig-tasks dlq list` shows their ids")
    described = as_json(found[0])
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    attributes, body = described.pop("attributes"), described.pop("body", None)
    for key, value in described.items():
        print(f"{key + ':':14} {value}")
    print("attributes:")
    for key, value in sorted(attributes.items()):
        print(f"  {key}: {value}")
    print("body:")
    print(_pretty(body) if body is not None else f"  (not UTF-8; base64) {described['body_base64']}")
    return 0


def _pretty(body: str) -> str:
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        return body


# -- requeue and purge ------------------------------------------------------------------------


class _Progress:
    """``requeued 40/120`` on stderr: rewritten in place on a terminal, a line a second otherwise."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        text = f"{self.verb} {done:,}" + (f"/{total:,}" if total is not None else "")
        now = time.monotonic()
        if self.tty:
            print(f"\r{text}", end="", file=sys.stderr, flush=True)
        elif now - self.last >= PROGRESS_EVERY_S or done == total:
            print(text, file=sys.stderr, flush=True)
            self.last = now

    def finish(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not answer:
        print(file=sys.stderr)
    return answer.strip().lower() in ("y", "yes")


def _plan(args: argparse.Namespace, app: Hedwig) -> tuple[list[str] | None, str]:
    """The ids to act on (None: all, up to --limit) and how many that is, in words."""
    if not (args.ids or record_filters(args)):
        total = dead_letter_total(app)
        if args.limit is not None:
            count = args.limit if total is None else min(args.limit, total)
            return None, f"the oldest {count:,}" if total is None else f"{count:,}"
        return None, "all" if total is None else f"all {total:,}"
    records, _ = _select(args, app, args.limit or args.scan)
    return [r.transport_id for r in records], f"{len(records):,}"


def _act(args: argparse.Namespace, app: Hedwig, verb: str, done_verb: str) -> int:
    ids, count = _plan(args, app)
    if ids == []:
        print(f"no dead letter of {app.queue} matches; nothing {done_verb}", file=sys.stderr)
        return 0
    what = f"{count} dead letter(s) of {app.queue}"
    where = "back to the subscriptions they came from" if verb == "requeue" else "for good"
    if not _confirm(f"{verb} {what} {where}?", args.yes):
        print(f"not confirmed; nothing {done_verb} (--yes skips the question)", file=sys.stderr)
        return EXIT_DECLINED
    progress = _Progress(done_verb)
    method = app.transport.requeue_dead_letters if verb == "requeue" else app.transport.purge_dead_letters
    try:
        moved = method(app.queue, limit=None if ids else args.limit, progress=progress, ids=ids)
    finally:
        progress.finish()
    print(f"{done_verb} {moved:,} dead letter(s) of {app.queue}", file=sys.stderr)
    return 0


def cmd_requeue(args: argparse.Namespace, app: Hedwig) -> int:
    return _act(args, app, "requeue", "requeued")


def cmd_purge(args: argparse.Namespace, app: Hedwig) -> int:
    return _act(args, app, "purge", "purged")


# -- parser -----------------------------------------------------------------------------------


def _filter_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters (all must match)")
    group.add_argument("--subscription", metavar="TEXT", help="whose subscription's name contains TEXT")
    group.add_argument("--type", metavar="TYPE", help="of this message type")
    group.add_argument("--reason", metavar="TEXT", help="whose reason contains TEXT (any case)")
    group.add_argument("--older-than", type=parse_age, metavar="AGE", help="dead longer than AGE (90s, 15m, 2h, 3d)")
    group.add_argument("--newer-than", type=parse_age, metavar="AGE", help="dead for less than AGE")
    group.add_argument(
        "--scan",
        type=int,
        default=DEFAULT_SCAN,
        metavar="N",
        help="filter at most N, oldest first (%(default)s)",
    )


def add_dlq_commands(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """``dlq list|show|requeue|purge`` on the top-level parser's subcommands."""
    dlq = commands.add_parser("dlq", help="list, show, requeue or purge dead letters")
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="a table of dead letters, oldest first, and how many exist")
    common(listing)
    listing.add_argument("--json", action="store_true", help="a JSON object per line, every field")
    listing.add_argument("--limit", type=int, default=DEFAULT_LIST_LIMIT, help="show at most this many (%(default)s)")
    _filter_options(listing)
    listing.set_defaults(func=cmd_list)

    show = actions.add_parser("show", help="one dead letter in full: attributes, body, reason")
    common(show)
    show.add_argument("id", help="its id, as dlq list shows it")
    show.add_argument("--json", action="store_true", help="as JSON")
    show.set_defaults(func=cmd_show)

    for verb, func, help_text in (
        ("requeue", cmd_requeue, "move dead letters back to the subscriptions they came from"),
        ("purge", cmd_purge, "delete dead letters for good"),
    ):
        action = actions.add_parser(verb, help=help_text)
        common(action)
        action.add_argument("ids", nargs="*", metavar="ID", help="only these (ids as dlq list shows them)")
        action.add_argument("--limit", type=int, default=None, help="at most this many, oldest first")
        action.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
        _filter_options(action)
        action.set_defaults(func=func)
