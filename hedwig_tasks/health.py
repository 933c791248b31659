"""Health probes and the small HTTP server behind them (and behind ``/metrics``).

* ``/healthz`` answers 200 while the worker's receive loop is alive: it checks the time of the
  loop's last heartbeat, never the broker, so a liveness probe costs nothing. It answers 503
  once the loop has not come round for ``stall_after_s``.
* ``/readyz`` answers 200 once the worker is connected and consuming, 503 before that and
  while it shuts down.
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hedwig_tasks.worker import Worker

__all__ = ["ProbeServer", "health_routes"]

logger = logging.getLogger(__name__)

#: How long the receive loop may go without a heartbeat before /healthz fails, in seconds.
DEFAULT_STALL_AFTER_S = 60.0

#: A route answers ``(status, content type, body)``.
Route = Callable[[], tuple[int, str, str]]


def health_routes(worker: Worker, *, stall_after_s: float = DEFAULT_STALL_AFTER_S) -> dict[str, Route]:
    """``/healthz`` and ``/readyz`` for one worker."""

    def healthz() -> tuple[int, str, str]:
        silent_s = time.monotonic() - worker.last_beat
        if silent_s > stall_after_s:
            return 503, "text/plain", f"receive loop stalled: no heartbeat for {silent_s:.0f}s\n"
        return 200, "text/plain", "ok\n"

    def readyz() -> tuple[int, str, str]:
        if worker.stopping:
            return 503, "text/plain", "shutting down\n"
        if not worker.ready:
            return 503, "text/plain", "not consuming yet\n"
        return 200, "text/plain", "ready\n"

    return {"/healthz": healthz, "/readyz": readyz}


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: Mapping[str, Route] = {}

    def do_GET(self) -> None:
        route = self.routes.get(self.path.split("?", 1)[0])
        status, content_type, body = route() if route else (404, "text/plain", "not found\n")
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("probe %s", format % args)


class ProbeServer:
    """Serves routes on ``host:port`` from a daemon thread until :meth:`close`."""

    def __init__(self, routes: Mapping[str, Route], *, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104
        handler = type("ProbeHandler", (_Handler,), {"routes": dict(routes)})
        self._server = http.server.ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="hedwig-probes", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
