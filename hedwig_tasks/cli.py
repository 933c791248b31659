"""``hedwig-tasks``: run a worker, publish, provision, inspect and requeue dead letters.

A thin layer over :class:`~hedwig_tasks.worker.Worker` and the app; every command finds the
app with ``-A module[:attribute]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from hedwig_tasks.app import Hedwig
from hedwig_tasks.exceptions import HedwigError
from hedwig_tasks.health import ProbeServer, Route, health_routes
from hedwig_tasks.metrics import Metrics
from hedwig_tasks.transports.base import DeadLetterRecord
from hedwig_tasks.worker import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PREFETCH,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    Worker,
    WorkerOptions,
)

__all__ = ["main"]

logger = logging.getLogger("hedwig_tasks")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

EXIT_OK = 0
EXIT_CONFIG = 1  # the app, a setting or the schema is wrong
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_TRANSPORT = 3  # the broker could not be reached

EXIT_CODES = """exit codes:
  0  stopped cleanly (SIGTERM/SIGINT, or --burst found nothing left)
  1  the app, a setting or the schema is wrong (the message says which)
  2  bad command-line arguments
  3  the transport failed at start-up (unreachable broker, bad credentials)
"""


def load_app(spec: str) -> Hedwig:
    """The app named by ``module[:attribute]``; the module's only Hedwig instance if no attribute.

    Raises :class:`~hedwig_tasks.exceptions.ConfigurationError` (via ``HedwigError``) or ``SystemExit``.
    """
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise SystemExit(
                f"error: -A {spec}: no module named {exc.name!r} (run from your project's directory?)"
            ) from None
        raise
    if attribute:
        app = getattr(module, attribute, None)
        if not isinstance(app, Hedwig):
            raise SystemExit(f"error: -A {spec}: {attribute!r} is not a Hedwig app in {module_name}")
        return app
    apps = {name: value for name, value in vars(module).items() if isinstance(value, Hedwig)}
    if len(apps) != 1:
        found = ", ".join(sorted(apps)) or "none"
        raise SystemExit(
            f"error: -A {spec}: expected one Hedwig app in {module_name}, found {found}; "
            f"name it as {module_name}:ATTRIBUTE"
        )
    return next(iter(apps.values()))


def app_from_settings(settings_module: str | None) -> Hedwig:
    """The app Hedwig-style settings describe: ``--settings``, ``$SETTINGS_MODULE`` or Django's."""
    if settings_module:
        os.environ["SETTINGS_MODULE"] = settings_module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not os.environ.get("SETTINGS_MODULE") and os.environ.get("DJANGO_SETTINGS_MODULE"):
        import django

        django.setup()  # runs the app config, which builds the app and discovers handlers
    from hedwig_tasks.conf import default_app

    return default_app()


def _app_of(args: argparse.Namespace) -> Hedwig:
    app = load_app(args.app) if args.app else app_from_settings(args.settings)
    if getattr(args, "transport", None):
        app._transport_spec, app._transport = args.transport, None
    return app


# -- worker ---------------------------------------------------------------------------------------


def _install_signals(worker: Worker) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if worker._stopping.is_set():
            logger.warning("%s again: not waiting for running handlers", name)
        else:
            logger.info("%s: finishing running handlers, releasing the rest (again to stop at once)", name)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def cmd_worker(args: argparse.Namespace, app: Hedwig) -> int:
    options = WorkerOptions(
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        topics=args.subscription or None,
        burst=args.burst,
        shutdown_timeout_s=args.shutdown_timeout,
    )
    if not app.subscribed_topics():
        raise SystemExit(f"error: {app.name!r} has no handlers; nothing to consume")
    worker = Worker(app, options)
    _install_signals(worker)
    servers = _probe_servers(args, worker)
    try:
        worker.run()
    finally:
        for server in servers:
            server.close()
    return EXIT_OK


def _probe_servers(args: argparse.Namespace, worker: Worker) -> list[ProbeServer]:
    """The /metrics and /healthz, /readyz servers asked for (one server when the ports agree)."""
    by_port: dict[int, dict[str, Route]] = {}
    if args.metrics_port is not None:
        metrics = Metrics(worker.app, worker)
        by_port.setdefault(args.metrics_port, {})["/metrics"] = lambda: (200, PROMETHEUS_TEXT, metrics.render())
    if args.health_port is not None:
        by_port.setdefault(args.health_port, {}).update(health_routes(worker))
    servers = []
    for port, routes in by_port.items():
        server = ProbeServer(routes, port=port, host=args.probe_host)
        logger.info("serving %s on port %d", ", ".join(sorted(routes)), server.port)
        servers.append(server)
    return servers


# -- publish, provision, status, dlq --------------------------------------------------------------


def _parse_headers(pairs: Sequence[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --header {pair!r}: expected KEY=VALUE")
        headers[key] = value
    return headers


def cmd_publish(args: argparse.Namespace, app: Hedwig) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise SystemExit(f"error: DATA is not valid JSON: {exc}") from None
    message = app.publish(args.type, args.version, data, headers=_parse_headers(args.header))
    print(f"published {message.type} {message.version} id={message.id}")
    return EXIT_OK


def cmd_provision(args: argparse.Namespace, app: Hedwig) -> int:
    actions = app.provision(dry_run=args.dry_run)
    prefix = "would " if args.dry_run else ""
    for action in actions:
        print(prefix + action)
    if not actions:
        print("nothing to do: everything exists")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, app: Hedwig) -> int:
    rows = app.transport.status(app.queue, app.subscribed_topics())
    print(f"{'subscription':40} {'depth':>8} {'in flight':>10} {'dead':>8}")
    for row in rows:
        cells = ["-" if v is None else str(v) for v in (row.depth, row.in_flight, row.dead_letters)]
        print(f"{row.subscription:40} {cells[0]:>8} {cells[1]:>10} {cells[2]:>8}")
    return EXIT_OK


def _describe_dead(record: DeadLetterRecord) -> dict[str, Any]:
    body = record.body.decode("utf-8", errors="replace")
    return {
        "id": record.attributes.get("hedwig_id", record.transport_id),
        "subscription": record.subscription,
        "attempts": record.attempts,
        "reason": record.reason,
        "schema": record.attributes.get("hedwig_schema", ""),
        "body": body if len(body) <= 200 else body[:197] + "...",
    }


def cmd_dlq(args: argparse.Namespace, app: Hedwig) -> int:
    if args.action == "list":
        records = app.transport.dead_letters(app.queue, limit=args.limit)
        for record in records:
            print(json.dumps(_describe_dead(record)))
        print(f"{len(records)} dead letter(s) shown", file=sys.stderr)
        return EXIT_OK

    def progress(done: int, total: int | None) -> None:
        print(f"\rrequeued {done}" + (f"/{total}" if total is not None else ""), end="", file=sys.stderr, flush=True)

    moved = app.transport.requeue_dead_letters(app.queue, limit=args.limit, progress=progress)
    print(f"\nrequeued {moved} message(s)", file=sys.stderr)
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-A", "--app", metavar="MODULE[:ATTR]", help="the module holding the Hedwig app")
    parser.add_argument(
        "--settings",
        metavar="MODULE",
        help="without -A: build the app from Hedwig settings in MODULE "
        "(default: $SETTINGS_MODULE, else Django's $DJANGO_SETTINGS_MODULE)",
    )
    parser.add_argument("--transport", metavar="URL", help="override the app's transport URL")
    parser.add_argument(
        "-l", "--loglevel", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="log lines as text or JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hedwig-tasks",
        description="Typed, versioned messages between services, on Hedwig's wire format.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = commands.add_parser(
        "worker",
        help="consume the app's subscriptions and run its handlers",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(worker)
    worker.add_argument(
        "-c", "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="handler threads (%(default)s)"
    )
    worker.add_argument(
        "--prefetch", type=int, default=DEFAULT_PREFETCH, help="messages held beyond those running (%(default)s)"
    )
    worker.add_argument(
        "-Q", "--subscription", action="append", metavar="TOPIC", help="consume only this topic (repeatable)"
    )
    worker.add_argument("--burst", action="store_true", help="exit when the subscriptions are empty")
    worker.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="SECONDS",
        help="how long running handlers may finish after SIGTERM (%(default)s)",
    )
    worker.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on /metrics")
    worker.add_argument("--health-port", type=int, metavar="PORT", help="serve /healthz (liveness) and /readyz")
    worker.add_argument(
        "--probe-host",
        default="0.0.0.0",  # noqa: S104 - probes are reached from outside the pod
        metavar="HOST",
        help="address to serve those on (%(default)s)",
    )
    worker.set_defaults(func=cmd_worker)

    publish = commands.add_parser("publish", help="validate and publish one message")
    _common(publish)
    publish.add_argument("type", help="message type, such as send_email")
    publish.add_argument("version", help="schema version, such as 1.0")
    publish.add_argument("data", help="the data as JSON")
    publish.add_argument("-H", "--header", action="append", default=[], metavar="KEY=VALUE")
    publish.set_defaults(func=cmd_publish)

    provision = commands.add_parser("provision", help="create the app's topics and subscriptions (idempotent)")
    _common(provision)
    provision.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    provision.set_defaults(func=cmd_provision)

    status = commands.add_parser("status", help="depth, in flight and dead letters per subscription")
    _common(status)
    status.set_defaults(func=cmd_status)

    dlq = commands.add_parser("dlq", help="list or requeue dead letters")
    _common(dlq)
    dlq.add_argument("action", choices=["list", "requeue"])
    dlq.add_argument("--limit", type=int, default=None, help="at most this many (list: 100)")
    dlq.set_defaults(func=cmd_dlq)
    return parser


#: Fields a log record may carry (through ``extra=``) that the JSON format writes out.
LOG_FIELDS = (
    "message_id",
    "message_type",
    "message_version",
    "attempt",
    "duration_ms",
    "outcome",
    "retry_in_s",
    "subscription",
    "transport_id",
)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the message fields, any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in LOG_FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        formatter: logging.Formatter = JSONFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dlq" and args.action == "list" and args.limit is None:
        args.limit = 100
    _configure_logging(args.loglevel, args.log_format)
    try:
        app = _app_of(args)
        try:
            code: int = args.func(args, app)
        finally:
            app.close()
    except HedwigError as exc:
        from hedwig_tasks.exceptions import TransportError

        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TRANSPORT if isinstance(exc, TransportError) else EXIT_CONFIG
    return code


if __name__ == "__main__":
    sys.exit(main())
