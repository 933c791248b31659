"""Waking consumers of a SQLite bus at once when a message becomes visible, in any process.

SQLite tells no one about a commit, so an idle consumer would have to poll, trading latency for
idle CPU. Instead each waiting consumer binds a Unix datagram socket in a directory beside the
bus file (``<bus>.wake/<token>-<topics>.sock``) and blocks on it, with its poll interval as the
timeout; after a commit that makes messages visible, the writer sends one byte to every socket
there, without blocking. The name carries a short hash of each topic the consumer takes (up to
five), so a publish wakes only the consumers of its topic, and an idle worker is not woken by a
busy neighbour on the same bus; a consumer of more topics is woken by every publish. A socket
whose queue is full is already awake. A socket nobody binds any more (its process was killed)
refuses the byte and is removed by the writer that found it.

Everything here is an optimisation: where Unix datagram sockets are missing (Windows) or the
directory cannot be made, no one is woken and consumers find messages by polling, as before.
Messages that come due by the clock (delayed retries, leases that ran out) are found by polling.
When the bus path is too long for a socket address (about 100 bytes), the directory goes in the
temporary directory instead, named after a hash of the bus path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
import weakref
from pathlib import Path

__all__ = ["Listener", "WakeChannel"]

logger = logging.getLogger(__name__)

#: Longest socket path the directory may lead to (Linux allows 107 bytes, macOS 103).
MAX_SOCKET_PATH = 100
#: Room left in a socket path for the socket's name, in bytes.
NAME_ROOM = 48
#: Most topics a socket's name lists; a consumer of more is woken for every topic.
MAX_NAMED_TOPICS = 5
#: Hex digits of a topic's hash in a socket's name.
_HASH_DIGITS = 6
#: Longest a writer trusts its list of sockets without looking at the directory again, in seconds
#: (a directory's modification time may not tick for every change on coarse file systems).
RESCAN_S = 1.0
#: The byte each wake-up carries.
_PING = b"\x01"


def _directory_for(bus: Path) -> Path:
    beside = bus.with_name(bus.name + ".wake")
    if len(os.fsencode(beside)) + NAME_ROOM <= MAX_SOCKET_PATH:
        return beside
    digest = hashlib.sha256(os.fsencode(os.path.realpath(bus))).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"hedwig-{digest}.wake"


def topic_hash(topic: str) -> str:
    """A short hash of a topic name (a collision only wakes a consumer for nothing)."""
    return hashlib.sha1(topic.encode(), usedforsecurity=False).hexdigest()[:_HASH_DIGITS]


def _name(topics: list[str]) -> str:
    hashes = "".join(sorted({topic_hash(t) for t in topics})) if len(topics) <= MAX_NAMED_TOPICS else ""
    return f"{secrets.token_hex(4)}-{hashes}.sock"


def _hashes_in(name: str) -> frozenset[str] | None:
    """The topic hashes a socket's name lists; None when it takes every topic (or is not ours)."""
    hashes = name[:-5].partition("-")[2]
    if not hashes or len(hashes) % _HASH_DIGITS:
        return None
    return frozenset(hashes[i : i + _HASH_DIGITS] for i in range(0, len(hashes), _HASH_DIGITS))


class WakeChannel:
    """The wake-up directory of one bus file: writers :meth:`notify`, consumers :meth:`listen`."""

    def __init__(self, bus: Path) -> None:
        self.directory = _directory_for(bus)
        self._sender: socket.socket | None = None
        self._sender_pid = 0
        self._seen: tuple[int, float] = (-1, 0.0)  # (directory mtime, when read) of ``_targets``
        self._targets: list[tuple[str, frozenset[str] | None]] = []  # (path, topic hashes)
        self._lock = threading.Lock()
        self.enabled = hasattr(socket, "AF_UNIX")

    def listen(self, topics: list[str]) -> Listener | None:
        """A socket bound in the directory for a consumer of ``topics`` to wait on; None if that fails."""
        if not self.enabled:
            return None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return Listener(self.directory / _name(topics))
        except OSError as exc:
            logger.debug("no wake-up socket in %s (%s): consumers poll", self.directory, exc)
            return None

    def notify(self, topic: str | None = None) -> None:
        """Send a byte to every consumer of ``topic`` (None: of any); never blocks, never raises."""
        if not self.enabled:
            return
        try:
            targets = self._current_targets()
            sender = self._socket()
        except OSError:
            return
        wanted = None if topic is None else topic_hash(topic)
        for target, hashes in targets:
            if wanted is not None and hashes is not None and wanted not in hashes:
                continue
            try:
                sender.sendto(_PING, target)
            except BlockingIOError:  # its queue is full: it has a wake-up waiting already
                pass
            except (ConnectionRefusedError, FileNotFoundError):  # its process is gone
                self._forget(target)
            except OSError:
                pass

    def _socket(self) -> socket.socket:
        if self._sender is None or self._sender_pid != os.getpid():  # never share one across a fork
            sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sender.setblocking(False)
            self._sender, self._sender_pid = sender, os.getpid()
        return self._sender

    def _current_targets(self) -> list[tuple[str, frozenset[str] | None]]:
        mtime = os.stat(self.directory).st_mtime_ns
        now = time.monotonic()
        seen_mtime, read_at = self._seen
        if mtime != seen_mtime or now - read_at > RESCAN_S:
            with self._lock:
                entries = [e for e in os.scandir(self.directory) if e.name.endswith(".sock")]
                self._targets = [(e.path, _hashes_in(e.name)) for e in entries]
                self._seen = (mtime, now)
        return self._targets

    def _forget(self, target: str) -> None:
        try:
            os.unlink(target)
        except OSError:
            pass
        self._seen = (-1, 0.0)

    def close(self) -> None:
        if self._sender is not None and self._sender_pid == os.getpid():
            self._sender.close()
        self._sender = None


class Listener:
    """One consumer's bound socket: :meth:`wait` blocks until a wake-up or the timeout.

    It starts with a wake-up queued: its owner looked for messages before it was bound, and a
    commit in between found no socket to wake, so the first wait returns at once to look again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid = os.getpid()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._socket.bind(os.fspath(path))
            self._socket.sendto(_PING, os.fspath(path))
        except OSError:
            _unbind(self._socket, path, self.pid)
            raise
        self._finalizer = weakref.finalize(self, _unbind, self._socket, path, self.pid)

    def wait(self, timeout_s: float) -> bool:
        """Block until woken (True) or ``timeout_s`` passed (False); then empty the queue."""
        self._socket.settimeout(timeout_s)
        try:
            self._socket.recv(16)
        except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
            return False
        except OSError:
            return False
        self._socket.setblocking(False)
        try:
            while self._socket.recv(16):
                pass
        except OSError:  # BlockingIOError once empty
            pass
        return True

    def close(self) -> None:
        self._finalizer()  # once only, however often called


def _unbind(sock: socket.socket, path: Path, pid: int) -> None:
    sock.close()
    if pid == os.getpid():  # a parent's socket file is still the parent's
        try:
            os.unlink(path)
        except OSError:
            pass
