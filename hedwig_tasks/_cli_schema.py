"""``hedwig-tasks schema``: commands about the schema as a contract between services.

``schema check OLD NEW`` says whether a schema change keeps every (type, major) compatible;
``schema docs`` writes an AsyncAPI 3.0 document and an HTML catalogue of an app's messages.

Each subcommand is added by one ``add_*(actions, common)`` function listed in
``SCHEMA_COMMANDS``; a subcommand that lives in another module adds its function there.
A subcommand that builds no app sets ``needs_app=False``: ``cli.main`` then calls its ``func``
with ``None`` for the app (and it loads what it needs itself).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from hedwig_tasks._cli_app import CLIError
from hedwig_tasks.schema_tools.findings import BOTH, MODES

__all__ = ["SCHEMA_COMMANDS", "add_schema_commands"]

EXIT_OK = 0
EXIT_VIOLATION = 1  #: an incompatible change, or a schema that cannot be read as one
EXIT_USAGE = 2  #: bad arguments: argparse's code, and a file or revision that does not exist

Common = Callable[[argparse.ArgumentParser], None]


def _no_app(parser: argparse.ArgumentParser) -> None:
    """Defaults ``cli.main`` reads from every command, for a subcommand without ``common``."""
    parser.set_defaults(needs_app=False, loglevel="WARNING", log_format="text")


def add_check_command(actions: Any, common: Common) -> None:
    """``schema check OLD NEW``."""
    check = actions.add_parser("check", help="is NEW a compatible change of OLD? (files or REV:PATH)")
    check.add_argument("old", metavar="OLD", help="the schema before: a file, or REV:PATH in git")
    check.add_argument("new", metavar="NEW", help="the schema after: a file, or REV:PATH in git")
    check.add_argument(
        "--mode",
        choices=MODES,
        default=BOTH,
        help="both (default: old and new consumers read every message), backward (new consumers read "
        "old messages) or forward (old consumers read new messages)",
    )
    check.add_argument("--json", action="store_true", help="print the verdict and every change as JSON")
    check.add_argument(
        "-I", "--proto-path", action="append", default=[], metavar="DIR", help="protoc include path for .proto files"
    )
    _no_app(check)
    check.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace, app: None) -> int:
    """0 when NEW is a compatible change of OLD, 1 on a violation (or a broken schema), 2 on bad arguments."""
    from hedwig_tasks.schema_tools import check
    from hedwig_tasks.schema_tools.sources import SourceNotFound

    try:
        report = check(args.old, args.new, mode=args.mode, include=args.proto_path)
    except SourceNotFound as exc:
        raise CLIError(str(exc), code=EXIT_USAGE) from None
    if args.json:
        print(json.dumps({"old": args.old, "new": args.new, **report.as_json()}, indent=2))
    else:
        print(report.text())
    return EXIT_OK if report.compatible else EXIT_VIOLATION


def add_docs_command(actions: Any, common: Common) -> None:
    """``schema docs``."""
    docs = actions.add_parser("docs", help="write an AsyncAPI 3.0 document and an HTML catalogue")
    common(docs)
    docs.set_defaults(needs_app=False, func=cmd_docs)


def cmd_docs(args: argparse.Namespace, app: None) -> int:
    raise CLIError("schema docs: not written yet")


#: The ``schema`` subcommands, each ``(actions, common) -> None``; add yours to this tuple.
SCHEMA_COMMANDS: tuple[Callable[[Any, Common], None], ...] = (add_check_command, add_docs_command)


def add_schema_commands(commands: Any, common: Common) -> None:
    """``schema check|docs|...`` on the top-level parser's subcommands."""
    schema = commands.add_parser("schema", help="check schema changes, document the schema")
    actions = schema.add_subparsers(dest="action", required=True, metavar="ACTION")
    for add in SCHEMA_COMMANDS:
        add(actions, common)
