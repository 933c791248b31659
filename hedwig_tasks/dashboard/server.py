"""The dashboard's HTTP server: one static page, its script and style, and a small JSON API.

Stack: the standard library's :class:`http.server.ThreadingHTTPServer`, one HTML page with
plain JavaScript that builds every element with ``textContent`` (never ``innerHTML`` with data:
message bodies, reasons and headers are written by whoever published them), and charts drawn
as inline SVG. No web framework, template engine, chart library or build step: the
``dashboard`` extra installs nothing, the page works offline and behind any proxy, and the
whole attack surface is the few hundred lines here and in :mod:`~hedwig_tasks.dashboard.api`.
The page polls the API every ``refresh_s`` (plain ``fetch``: no connection held per tab, so a
forgotten tab costs a request every few seconds and nothing more).

Security:

* It listens on 127.0.0.1 unless told another host. While it does, it answers only requests
  whose ``Host`` is a loopback name, so a web page cannot reach it by DNS rebinding.
* Reading needs nothing. Whatever changes state (requeue, purge) is a ``POST`` of JSON that
  carries the server's random CSRF token (embedded in the page, new at each start) in the
  ``X-CSRF-Token`` header, whose ``Origin`` (when the browser sends one) is this server's own,
  and, when a token is set (``--token`` or ``HEDWIG_DASHBOARD_TOKEN``), ``Authorization:
  Bearer TOKEN`` or basic auth with TOKEN as the password.
* The transport URL shows with its password masked, as the worker's banner shows it.
* Every answer says ``Content-Security-Policy: default-src 'self'`` (no inline script runs, even
  one that escaped), ``X-Content-Type-Options: nosniff`` and no framing.
"""

from __future__ import annotations

import base64
import hmac
import http.server
import ipaddress
import json
import logging
import secrets
import threading
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from hedwig_tasks._cli_dlq import DEFAULT_SCAN
from hedwig_tasks.dashboard import api
from hedwig_tasks.dashboard.sampler import DEFAULT_SAMPLE_S, Sampler
from hedwig_tasks.exceptions import HedwigError

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Dashboard"]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5555
#: Seconds between the page's polls of the API.
DEFAULT_REFRESH_S = 2.0
#: Largest POST body read, in bytes.
MAX_BODY = 1_000_000
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")

STATIC = {
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Refused(Exception):
    """A request answered with ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _static(name: str) -> bytes:
    return resources.files("hedwig_tasks.dashboard").joinpath("static").joinpath(name).read_bytes()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class Dashboard:
    """The dashboard of one app: a sampler thread and an HTTP server (``start()`` or ``serve_forever()``).

    Raises ``OSError`` at construction when the port cannot be listened on.
    """

    def __init__(
        self,
        app: Hedwig,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        sample_s: float = DEFAULT_SAMPLE_S,
        refresh_s: float = DEFAULT_REFRESH_S,
        scan: int = DEFAULT_SCAN,
    ) -> None:
        self.app = app
        self.token = token or None
        self.csrf = secrets.token_urlsafe(32)
        self.refresh_s = refresh_s
        self.sampler = Sampler(app, sample_s=sample_s)
        self.dead_letters = api.DeadLetterBrowser(app, scan=scan)
        self.loopback_only = _is_loopback(host)
        handler = type("_BoundHandler", (_Handler,), {"dashboard": self})
        self.server = http.server.ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = str(self.server.server_address[0]), self.server.server_address[1]
        shown = host if ":" not in host else f"[{host}]"
        return f"http://{shown}:{port}/"

    def start(self) -> None:
        """Sample and serve on threads of their own."""
        self.sampler.start()
        self._thread = threading.Thread(target=self.server.serve_forever, name="hedwig-dashboard", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Sample on a thread and serve on this one until :meth:`close` (from another thread)."""
        self.sampler.start()
        self.server.serve_forever()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.sampler.close()
        if self._thread is not None:
            self._thread.join(10)

    # -- what the handler asks ----------------------------------------------------------------

    def page(self) -> bytes:
        html = _static("index.html").decode()
        return html.replace("{{csrf}}", self.csrf).encode()

    def get(self, path: str, query: dict[str, str]) -> Any:
        """The JSON answer to a GET of ``path``; :class:`Refused` for an unknown one."""
        if path == "/api/meta":
            return api.meta(self.app, refresh_s=self.refresh_s, token_required=self.token is not None)
        if path == "/api/subscriptions":
            return api.subscriptions(self.sampler)
        if path == "/api/workers":
            return api.workers(self.app)
        if path == "/api/schemas":
            return api.schemas(self.app)
        if path == "/api/dead-letters":
            return self.dead_letters.page(query)
        if path == "/api/dead-letter":
            found = self.dead_letters.one(query.get("id", ""))
            if found is None:
                raise Refused(404, "no such dead letter: it was requeued or purged")
            return found
        raise Refused(404, f"not found: {path}")

    def post(self, path: str, body: Any) -> Any:
        verb = {"/api/dead-letters/requeue": "requeue", "/api/dead-letters/purge": "purge"}.get(path)
        if verb is None:
            raise Refused(404, f"not found: {path}")
        if not isinstance(body, dict):
            raise Refused(400, "expected a JSON object")
        return self.dead_letters.act(verb, body)

    def check_write(self, headers: Any, host: str) -> None:
        """Refuse a state change without the CSRF token, from another origin, or without the token."""
        sent = headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(sent.encode(), self.csrf.encode()):
            raise Refused(403, "missing or wrong X-CSRF-Token: reload the page")
        origin = headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            raise Refused(403, f"cross-origin request refused (Origin {origin})")
        if headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise Refused(403, "cross-site request refused")
        if (headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            raise Refused(415, "expected Content-Type: application/json")
        if self.token is not None and not self._authorized(headers.get("Authorization", "")):
            raise Refused(401, "this dashboard needs its token to change anything")

    def _authorized(self, header: str) -> bool:
        kind, _, value = header.partition(" ")
        if kind.lower() == "bearer":
            given = value.strip()
        elif kind.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            return False
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())


class _Handler(http.server.BaseHTTPRequestHandler):
    dashboard: Dashboard
    server_version = "hedwig-tasks-dashboard"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("dashboard: " + format, *args)

    def _host(self) -> str:
        host = self.headers.get("Host", "")
        if self.dashboard.loopback_only and host.rsplit(":", 1)[0] not in LOOPBACK_NAMES:
            raise Refused(421, f"Host {host!r} refused: this dashboard answers loopback names only")
        return host

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _get(self) -> None:
        self._host()
        parts = urlsplit(self.path)
        if parts.path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.dashboard.page())
        elif parts.path == "/favicon.ico":
            self._send(204, "image/x-icon", b"")
        elif parts.path in STATIC:
            name, content_type = STATIC[parts.path]
            self._send(200, content_type, _static(name))
        else:
            self._json(200, self.dashboard.get(parts.path, dict(parse_qsl(parts.query))))

    def _post(self) -> None:
        self.dashboard.check_write(self.headers, self._host())
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise Refused(413, "request too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            raise Refused(400, "the body is not JSON") from None
        self._json(200, self.dashboard.post(urlsplit(self.path).path, body))

    def _answer(self, serve: Any) -> None:
        try:
            serve()
        except Refused as exc:
            self._json(exc.status, {"error": str(exc)})
        except api.BadRequest as exc:
            self._json(400, {"error": str(exc)})
        except HedwigError as exc:
            logger.warning("dashboard: %s %s failed: %s", self.command, self.path, exc)
            self._json(502, {"error": str(exc)})

    def _json(self, status: int, data: Any) -> None:
        self._send(status, "application/json", json.dumps(data, default=str).encode())

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
