"""``hedwig-tasks``: run a worker, publish, provision, see status, inspect and requeue dead letters.

A thin layer over :class:`~hedwig_tasks.worker.Worker` and the app; every command finds the
app with ``-A module[:attribute]`` (``_cli_app``) or builds it from Hedwig settings. ``dlq`` lives
in ``_cli_dlq``. Every error is one line on stderr, ``error: ...``, naming the option or setting
at fault and what to do, with the exit codes ``EXIT_CODES`` lists.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from hedwig_tasks._cli_app import EXIT_CONFIG, EXIT_UNAVAILABLE, CLIError, find_app, masked_url
from hedwig_tasks._cli_beat import add_beat_command
from hedwig_tasks._cli_dashboard import add_dashboard_command
from hedwig_tasks._cli_dlq import add_dlq_commands
from hedwig_tasks._cli_inspect import add_inspect_command
from hedwig_tasks._cli_schema import add_schema_commands
from hedwig_tasks._version import __version__
from hedwig_tasks._worker_options import DEFAULT_HEARTBEAT_S
from hedwig_tasks.app import TRANSPORT_ENV, Hedwig
from hedwig_tasks.exceptions import HedwigError, TransportError
from hedwig_tasks.health import ProbeServer, Route, health_routes
from hedwig_tasks.metrics import Metrics
from hedwig_tasks.pool import POOLS
from hedwig_tasks.transports import DEFAULT_URL
from hedwig_tasks.transports.base import SubscriptionStatus, Transport
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
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_TRANSPORT = EXIT_UNAVAILABLE  # the broker could not be reached, or a port is taken

EXIT_CODES = """exit codes:
  0  done; a worker stopped cleanly (SIGTERM/SIGINT, or --burst found nothing left)
  1  the app, a setting or the schema is wrong, or a dlq question was answered no
     (the message says which option or setting, and what to do)
  2  bad command-line arguments
  3  something needed at start-up is unavailable: an unreachable broker, bad
     credentials, a --metrics-port or --health-port already in use
"""


def _app_of(args: argparse.Namespace) -> Hedwig:
    app = find_app(args.app, args.settings)
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
    if args.heartbeat < 0:
        raise CLIError(f"--heartbeat must be 0 (no row) or more seconds, got {args.heartbeat:g}")
    options = WorkerOptions(
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        topics=args.subscription or None,
        burst=args.burst,
        shutdown_timeout_s=args.shutdown_timeout,
        time_limit_s=args.time_limit,
        pool=args.pool,
        app_spec=args.app,
        settings_spec=args.settings,
        max_tasks_per_child=args.max_tasks_per_child,
        max_memory_per_child_kb=args.max_memory_per_child,
        heartbeat_s=args.heartbeat or None,
    )
    if not app.subscribed_topics():
        raise CLIError(
            f"{app.name!r} has no handlers, so there is nothing to consume: declare one with "
            "@hedwig.handler(...) in the module -A names (a publish-only service needs no worker)"
        )
    worker = Worker(app, options)
    servers = _probe_servers(args, worker)
    _banner(args, app, options.topics or app.subscribed_topics())
    _install_signals(worker)
    try:
        worker.run()
    finally:
        for server in servers:
            server.close()
    return EXIT_OK


def transport_text(app: Hedwig) -> str:
    """The app's transport as its URL with any password masked (a transport object: its repr)."""
    spec = app._transport_spec
    if isinstance(spec, Transport):
        return repr(spec)
    return masked_url(str(spec or os.environ.get(TRANSPORT_ENV) or DEFAULT_URL))


def _banner(args: argparse.Namespace, app: Hedwig, topics: Sequence[str]) -> None:
    """What is about to run, once, before the worker starts: a block of text, or a JSON log line."""
    fields = {
        "app": f"{app.name} ({args.app or 'from settings'})",
        "transport": transport_text(app),
        "queue": app.queue,
        "topics": ", ".join(topics),
        "concurrency": f"{args.concurrency} {'child processes' if args.pool == 'processes' else 'threads'}, "
        f"prefetch {args.prefetch}",
    }
    if args.log_format == "json":
        logger.info("hedwig-tasks %s worker: %s", __version__, "; ".join(f"{k} {v}" for k, v in fields.items()))
        return
    lines = [f"hedwig-tasks {__version__} worker (Python {platform.python_version()})"]
    lines += [f"  {key + ':':13}{value}" for key, value in fields.items()]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _probe_servers(args: argparse.Namespace, worker: Worker) -> list[ProbeServer]:
    """The /metrics and /healthz, /readyz servers asked for (one server when the ports agree).

    Raises :class:`CLIError` (exit 3) naming the option whose port cannot be listened on.
    """
    by_port: dict[int, dict[str, Route]] = {}
    options: dict[int, list[str]] = {}
    if args.metrics_port is not None:
        metrics = Metrics(worker.app, worker)
        by_port.setdefault(args.metrics_port, {})["/metrics"] = lambda: (200, PROMETHEUS_TEXT, metrics.render())
        options.setdefault(args.metrics_port, []).append("--metrics-port")
    if args.health_port is not None:
        by_port.setdefault(args.health_port, {}).update(health_routes(worker))
        options.setdefault(args.health_port, []).append("--health-port")
    servers: list[ProbeServer] = []
    for port, routes in by_port.items():
        try:
            server = ProbeServer(routes, port=port, host=args.probe_host)
        except OSError as exc:
            for started in servers:
                started.close()
            raise _port_error("/".join(options[port]), port, args.probe_host, exc) from None
        logger.info("serving %s on port %d", ", ".join(sorted(routes)), server.port)
        servers.append(server)
    return servers


def _port_error(option: str, port: int, host: str, exc: OSError) -> CLIError:
    if exc.errno == errno.EADDRINUSE:
        why = "is already in use (another worker on this machine?): choose a free port or stop what holds it"
    elif exc.errno == errno.EACCES:
        why = "needs privileges to listen on: choose a port above 1023"
    else:
        why = f"cannot be listened on ({exc.strerror or exc}): check --probe-host and the port"
    return CLIError(f"{option} {port}: port {port} on {host} {why}", EXIT_UNAVAILABLE)


# -- publish, provision, status, dlq --------------------------------------------------------------


def _parse_headers(pairs: Sequence[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--header {pair!r}: expected KEY=VALUE, such as -H request_id=r-1")
        headers[key] = value
    return headers


def cmd_publish(args: argparse.Namespace, app: Hedwig) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise CLIError(f'DATA is not valid JSON ({exc}): quote it for the shell, as \'{{"to": "a@b.c"}}\'') from None
    headers = _parse_headers(args.header)
    message = app.publish(args.type, args.version, data, headers=headers, delay_s=args.delay, expires_s=args.expires)
    due = f" (due in {args.delay:g}s)" if args.delay else ""
    print(f"published {message.type} {message.version} id={message.id}{due}")
    return EXIT_OK


def cmd_provision(args: argparse.Namespace, app: Hedwig) -> int:
    if args.terraform:
        from hedwig_tasks.terraform import write as write_terraform

        print(f"wrote Terraform for {app.name!r} to {write_terraform(app, args.terraform)}")
        return EXIT_OK
    actions = app.provision(dry_run=args.dry_run)
    prefix = "would " if args.dry_run else ""
    for action in actions:
        print(prefix + action)
    if not actions:
        print("nothing to do: everything exists")
    return EXIT_OK


def status_lines(rows: Sequence[SubscriptionStatus]) -> list[str]:
    """The ``status`` table, each row's details under it, and why a count shows as ``-``."""
    lines = [f"{'subscription':40} {'depth':>8} {'in flight':>10} {'dead':>8}"]
    reasons: list[str] = []
    for row in rows:
        cells = ["-" if v is None else str(v) for v in (row.depth, row.in_flight, row.dead_letters)]
        lines.append(f"{row.subscription:40} {cells[0]:>8} {cells[1]:>10} {cells[2]:>8}")
        lines += [f"  {label}: {text}" for label, text in row.details.items()]
        if "-" in cells and row.unknown_because and row.unknown_because not in reasons:
            reasons.append(row.unknown_because)
    lines += [f"-: {reason}" for reason in reasons]
    if not rows:
        lines.append("(no subscriptions: the app has no handlers, so it consumes nothing)")
    return lines


def cmd_status(args: argparse.Namespace, app: Hedwig) -> int:
    print("\n".join(status_lines(app.transport.status(app.queue, app.subscribed_topics()))))
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
    parser.add_argument(
        "--version", action="version", version=f"hedwig-tasks {__version__} (Python {platform.python_version()})"
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
    worker.add_argument(
        "--pool",
        choices=POOLS,
        default="threads",
        help="run handlers on threads (%(default)s) or in -c child processes (for CPU-bound handlers)",
    )
    worker.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="time limit of handlers that set no time_limit_s: then an async handler is cancelled, a "
        "thread abandoned and replaced, a child process killed and replaced; the message fails",
    )
    worker.add_argument(
        "--max-tasks-per-child", type=int, metavar="N", help="with --pool processes: replace a child after N messages"
    )
    worker.add_argument(
        "--max-memory-per-child",
        type=int,
        metavar="KIB",
        help="with --pool processes: replace a child after a message once its peak RSS passed KIB kibibytes",
    )
    worker.add_argument(
        "--heartbeat",
        type=float,
        default=DEFAULT_HEARTBEAT_S,
        metavar="SECONDS",
        help="how often the worker's row for `hedwig-tasks inspect` is written (%(default)s; 0: none); "
        "a worker that dies drops out after three",
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
    publish.add_argument("--delay", type=float, metavar="SECONDS", help="held by the broker this long before it is run")
    publish.add_argument(
        "--expires",
        type=float,
        metavar="SECONDS",
        help="not run (ignored or dead-lettered) if received later",
    )
    publish.set_defaults(func=cmd_publish)

    provision = commands.add_parser("provision", help="create the app's topics and subscriptions (idempotent)")
    _common(provision)
    provision.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    provision.add_argument("--terraform", metavar="DIR", help="write it as a Terraform module in DIR/<app> instead")
    provision.set_defaults(func=cmd_provision)

    status = commands.add_parser("status", help="depth, in flight and dead letters per subscription")
    _common(status)
    status.set_defaults(func=cmd_status)

    add_dlq_commands(commands, _common)
    add_beat_command(commands, _common)
    add_inspect_command(commands, _common)
    add_dashboard_command(commands, _common)
    add_schema_commands(commands, _common)
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
    """Run one command; returns its exit code (``EXIT_CODES``). Errors are one line on stderr."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.loglevel, args.log_format)
    try:
        if not getattr(args, "needs_app", True):  # schema check/docs: the command loads what it needs
            return int(args.func(args, None))
        app = _app_of(args)
        try:
            code: int = args.func(args, app)
        finally:
            app.close()
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except HedwigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TRANSPORT if isinstance(exc, TransportError) else EXIT_CONFIG
    return code


if __name__ == "__main__":
    sys.exit(main())
