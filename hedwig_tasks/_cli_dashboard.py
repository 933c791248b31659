"""``hedwig-tasks dashboard``: serve the app's dashboard (see :mod:`hedwig_tasks.dashboard`).

It listens on 127.0.0.1 unless ``--host`` says otherwise; ``--token`` (or
``HEDWIG_DASHBOARD_TOKEN``) is then needed for requeue and purge. It runs until SIGINT or
SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from hedwig_tasks._cli_app import EXIT_UNAVAILABLE, CLIError

__all__ = ["TOKEN_ENV", "add_dashboard_command"]

logger = logging.getLogger("hedwig_tasks")

TOKEN_ENV = "HEDWIG_DASHBOARD_TOKEN"  # noqa: S105 - the variable's name, not a secret


def cmd_dashboard(args: argparse.Namespace, app: Any) -> int:
    from hedwig_tasks.dashboard import Dashboard

    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        dashboard = Dashboard(app, host=args.host, port=args.port, token=token, sample_s=args.sample_every)
    except OSError as exc:
        why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc.strerror or exc})"
        raise CLIError(f"--port {args.port}: port {args.port} on {args.host} {why}", EXIT_UNAVAILABLE) from None
    if not dashboard.loopback_only and token is None:
        logger.warning("dashboard on %s without --token: anyone who reaches it can requeue and purge", args.host)
    print(f"hedwig-tasks dashboard of {app.name} on {dashboard.url}", file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=dashboard.server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        dashboard.serve_forever()
    finally:
        dashboard.server.server_close()
        dashboard.sampler.close()
    return 0


def add_dashboard_command(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``dashboard`` to the CLI's subcommands."""
    from hedwig_tasks.dashboard.sampler import DEFAULT_SAMPLE_S
    from hedwig_tasks.dashboard.server import DEFAULT_HOST, DEFAULT_PORT

    dashboard = commands.add_parser("dashboard", help="serve a web page of the app's queues, workers and dead letters")
    common(dashboard)
    dashboard.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (%(default)s)")
    dashboard.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (%(default)s: this machine only)")
    dashboard.add_argument(
        "--token", metavar="TOKEN", help=f"needed to requeue or purge (bearer or basic auth; default ${TOKEN_ENV})"
    )
    dashboard.add_argument(
        "--sample-every",
        type=float,
        default=DEFAULT_SAMPLE_S,
        metavar="SECONDS",
        help="seconds between samples of the counts (%(default)s)",
    )
    dashboard.set_defaults(func=cmd_dashboard)
