"""A TCP proxy a test owns, to take the network away between a client and a server and give it back.

The proxy listens on a free loopback port and forwards each connection to the target. ``cut()``
closes every connection it carries and stops listening, so new connections are refused, as when a
broker goes away; ``restore()`` listens again on the same port. The server behind it is never
touched, so a test can cut its own clients off a server that others share. It counts the bytes
the server sent, so a test can tell what a call cost.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

#: Longest the accept loop blocks before looking whether it should stop, in seconds.
ACCEPT_POLL_S = 0.05
#: Longest a connect to the target may take, in seconds.
CONNECT_TIMEOUT_S = 5.0


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port`` until cut or closed."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0  #: the port it listens on (chosen on the first start, kept after)
        self.accepted = 0  #: connections accepted, over every restore
        self.from_target = 0  #: bytes the target sent, over every connection
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None

    def __enter__(self) -> TcpProxy:
        self.restore()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.cut()

    def route(self, url: str) -> str:
        """``url`` (of the target) with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def restore(self) -> None:
        """Listen (again) on the proxy's port; idempotent."""
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(ACCEPT_POLL_S)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, args=(listener, self._stop), daemon=True)
        self._acceptor.start()

    def cut(self) -> None:
        """Refuse new connections and close every open one, both ways, at once."""
        listener, self._listener = self._listener, None
        self._stop.set()
        if listener is not None:
            listener.close()
        if self._acceptor is not None:
            self._acceptor.join(5)
            self._acceptor = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by cut()
                return
            client.settimeout(None)
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, CONNECT_TIMEOUT_S)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self.accepted += 1
            self._sockets |= {client, upstream}
        for source, sink, counted in ((client, upstream, False), (upstream, client, True)):
            threading.Thread(target=self._pump, args=(source, sink, counted), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        """Copy one direction until either side ends; then end both."""
        try:
            while chunk := source.recv(65536):
                if counted:  # before passing it on: once the client has it, it is counted
                    with self._lock:
                        self.from_target += len(chunk)
                sink.sendall(chunk)
        except OSError:
            pass  # cut, or the other pump already closed these
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._sockets -= {source, sink}
            source.close()
            sink.close()
