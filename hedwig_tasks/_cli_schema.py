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
from pathlib import Path
from typing import Any

from hedwig_tasks._cli_app import CLIError
from hedwig_tasks.schema_tools.codegen import add_codegen_command
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
    docs = actions.add_parser(
        "docs",
        help="write an AsyncAPI 3.0 document and an HTML catalogue of the app's messages (or of schema files)",
    )
    common(docs)
    docs.add_argument("--out", default="schema-docs", metavar="DIR", help="where to write them (%(default)s)")
    docs.add_argument(
        "--publisher",
        action="append",
        default=[],
        metavar="SERVICE=SCHEMA",
        help="a service that publishes every type of a Hedwig JSON-Schema file (a file or REV:PATH); repeatable",
    )
    docs.add_argument(
        "--consumer",
        action="append",
        default=[],
        metavar="SERVICE=TYPE:MAJOR",
        help="a service that consumes a type's major, such as billing=user-created:1; repeatable",
    )
    docs.add_argument("--title", help="the document's title (default: the app's name, else 'services')")
    docs.add_argument(
        "--since", metavar="SCHEMA", help="an older schema file (or REV:PATH): the catalogue says what changed since"
    )
    docs.set_defaults(needs_app=False, func=cmd_docs)


def _pair(option: str, text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not (sep and name and value):
        raise CLIError(f"{option} {text}: expected SERVICE=VALUE", code=EXIT_USAGE)
    return name, value


def _consumed(text: str) -> tuple[str, tuple[str, int]]:
    service, value = _pair("--consumer", text)
    message_type, _, major = value.rpartition(":")
    if not message_type or not major.isdigit():
        raise CLIError(
            f"--consumer {text}: expected SERVICE=TYPE:MAJOR, such as billing=user-created:1", code=EXIT_USAGE
        )
    return service, (message_type, int(major))


def _json_doc(spec: str) -> dict[str, Any]:
    from hedwig_tasks.schema_tools.sources import SourceNotFound, load

    try:
        loaded = load(spec)
    except SourceNotFound as exc:
        raise CLIError(str(exc), code=EXIT_USAGE) from None
    if loaded.kind != "json":
        raise CLIError(f"{spec}: schema docs reads JSON-Schema files; protobuf apps are documented with -A")
    return loaded.doc


def _contract(args: argparse.Namespace) -> Any:
    from hedwig_tasks._cli_app import find_app
    from hedwig_tasks.schema_tools.contract import from_app, from_schema_file, merge

    parts = []
    if args.app or args.settings:
        app = find_app(args.app, args.settings)
        try:
            parts.append(from_app(app))
        finally:
            app.close()
    consumed: dict[str, list[tuple[str, int]]] = {}
    for text in args.consumer:
        service, key = _consumed(text)
        consumed.setdefault(service, []).append(key)
    for text in args.publisher:
        service, spec = _pair("--publisher", text)
        parts.append(from_schema_file(service, _json_doc(spec), consumes=consumed.pop(service, ())))
    if not parts:
        raise CLIError("schema docs: give -A MODULE (the app), or --publisher SERVICE=SCHEMA", code=EXIT_USAGE)
    parts += [from_schema_file(s, {"id": "", "schemas": {}}, consumes=keys) for s, keys in consumed.items()]
    title = args.title or (parts[0].title if len(parts) == 1 else "services")
    return merge(title, parts)


def cmd_docs(args: argparse.Namespace, app: None) -> int:
    """Write ``asyncapi.json`` and the HTML catalogue into ``--out``; print what was written."""
    from hedwig_tasks.schema_tools.asyncapi import document
    from hedwig_tasks.schema_tools.catalogue import write_catalogue
    from hedwig_tasks.schema_tools.contract import from_schema_file

    contract = _contract(args)
    since = from_schema_file("before", _json_doc(args.since)) if args.since else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "asyncapi.json").write_text(json.dumps(document(contract), indent=2) + "\n", encoding="utf-8")
    pages = write_catalogue(contract, out, since=since)
    print(f"wrote {out / 'asyncapi.json'} (AsyncAPI 3.0) and {len(pages)} HTML pages in {out}")
    return EXIT_OK


#: The ``schema`` subcommands, each ``(actions, common) -> None``; add yours to this tuple.
SCHEMA_COMMANDS: tuple[Callable[[Any, Common], None], ...] = (add_check_command, add_docs_command, add_codegen_command)


def add_schema_commands(commands: Any, common: Common) -> None:
    """``schema check|docs|...`` on the top-level parser's subcommands."""
    schema = commands.add_parser("schema", help="check schema changes, document the schema")
    actions = schema.add_subparsers(dest="action", required=True, metavar="ACTION")
    for add in SCHEMA_COMMANDS:
        add(actions, common)
