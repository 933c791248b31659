"""The Kombu transport's connections: :class:`Broker`, the one object the transport, its
consumers and its administration all hold (where the broker is, which kind, the lease, the clock,
new links and each thread's kept link), and :class:`Link`, one Kombu connection and channel with
the error boundary that drops it. Also the driver errors mapped to ours. See ``kombu.py`` for
the design."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import amqp.exceptions
import amqp.transport
import kombu
import kombu.exceptions
import kombu.transport.pyamqp
from kombu.utils.url import parse_url

from hedwig_tasks.exceptions import ConfigurationError, HedwigError, TransportError
from hedwig_tasks.transports._boundary import boundary
from hedwig_tasks.transports._kombu_messages import Confirms, on_return
from hedwig_tasks.transports._kombu_wire import DELIVER

__all__ = ["DRIVER_ERRORS", "Broker", "Link", "chunked", "mask"]

logger = logging.getLogger("hedwig_tasks.transports.kombu")  # one logger for the whole transport

#: How long a receive leases a message before it is given back, in seconds.
DEFAULT_LEASE_S = 30.0
#: How long connecting may take, in seconds.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Most bytes one read of the socket takes (several frames: deliveries arrive back to back).
READ_CHUNK = 8192
#: An AMQP frame's header (type, channel, payload size) and the octet that ends every frame.
_FRAME_HEADER = struct.Struct(">BHI")
_FRAME_END = 0xCE
#: URL schemes the transport speaks.
SCHEMES = ("amqp", "amqps", "pyamqp")

#: The driver errors that become ``TransportError`` at the boundary (:meth:`Link.errors`).
DRIVER_ERRORS: tuple[type[BaseException], ...] = (kombu.exceptions.KombuError, amqp.exceptions.AMQPError, OSError)


def mask(url: str) -> str:
    """``url`` with its password hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":**@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Broker:
    """The broker one transport talks to; the transport, its consumers and its administration
    each hold it and ask it for links. Its settings do not change after construction.

    Raises ``ConfigurationError`` for a lease that is not positive or a URL it does not speak.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not lease_s > 0:
            raise ConfigurationError(f"lease_s must be positive, got {lease_s!r}")
        scheme = urlsplit(url).scheme
        if scheme.startswith("redis"):
            raise ConfigurationError(
                f"the kombu transport speaks RabbitMQ (amqp://) only; {scheme}:// is the Redis Streams transport's"
            )
        if scheme not in SCHEMES:
            raise ConfigurationError(f"the kombu transport speaks amqp://, amqps:// and pyamqp://, not {scheme}://")
        self.url = url
        self.lease_s = lease_s  #: seconds a receive leases a delivery
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock  #: epoch seconds, for leases (tests move it)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._kept: list[tuple[int, Link]] = []  # (pid, link) of every thread's kept link

    def __repr__(self) -> str:
        return f"<Broker {mask(self.url)!r}>"

    def link(self) -> Link:
        """A new, unopened connection, for one caller to use and reset."""
        return Link(self)

    def thread_link(self) -> Link:
        """This thread's kept connection (publishing, counts): threads wait on RabbitMQ's confirms side by side.

        Its publishes go out as whole buffers and their confirms are read without py-amqp's
        machinery (see :class:`_Wire`), on plain TCP; with TLS, through py-amqp.
        """
        link: Link | None = getattr(self._local, "link", None)
        if link is None or getattr(self._local, "pid", None) != os.getpid():
            link = Link(self, wire=True)
            self._local.link, self._local.pid = link, os.getpid()
            with self._lock:
                self._kept.append((os.getpid(), link))
        return link

    def close(self) -> None:
        """Drop every thread's kept connection; the next call connects again."""
        with self._lock:
            kept, self._kept = self._kept, []
            self._local = threading.local()
        for pid, link in kept:
            if pid == os.getpid():  # never talk on a parent's connection after a fork
                link.reset()


class Link:
    """One Kombu connection and its channel in confirm mode, opened on first use and dropped on
    any driver error.

    ``generation`` changes each time the connection is opened or dropped, so a consumer can tell
    a delivery of an earlier connection (which settles nothing) from one of this. Every frame
    written on the connection goes out under ``write_lock``, so a thread that only writes (acks)
    may do so while another reads.
    """

    def __init__(self, broker: Broker, *, wire: bool = False) -> None:
        self.broker = broker
        self._wire = wire  # publish through a _Wire when the connection is plain TCP
        self.connection: kombu.Connection | None = None
        self._channel: Any = None
        self._confirms: Confirms | None = None
        self.write_lock = threading.Lock()
        self._reset_lock = threading.Lock()
        self.generation = 0

    @property
    def channel(self) -> Any:
        """The channel, connecting first if need be."""
        if self.connection is None:
            connection = _connection(self.broker.url, self.broker.connect_timeout_s)
            try:
                connection.ensure_connection(max_retries=0)
                raw = connection.connection  # py-amqp's
                raw.frame_writer = _locked(raw.frame_writer, self.write_lock)
                channel = connection.channel()
                channel.events["basic_return"].add(on_return)
                plain = self._wire and type(raw.transport) is _ChunkedTCPTransport  # TLS: py-amqp's path
                confirms = Confirms(channel, _Wire(raw, channel.channel_id, self.write_lock) if plain else None)
            except BaseException:
                with contextlib.suppress(Exception):
                    connection.release()
                raise
            self.connection = connection
            self.generation += 1
            # Last, so that ``current`` never pairs the new channel with the old generation.
            self._channel, self._confirms = channel, confirms
        return self._channel

    @property
    def current(self) -> tuple[Any, int]:
        """The channel if connected (else None), and the generation; connects nothing."""
        return self._channel, self.generation

    @property
    def confirms(self) -> Confirms:
        """Publishing on the channel with the broker's confirms, connecting first if need be."""
        self.channel  # noqa: B018 - connects
        assert self._confirms is not None
        return self._confirms

    def reset(self) -> None:
        """Drop the connection, without raising; the next use connects again."""
        with self._reset_lock:
            connection, self.connection, self._channel, self._confirms = self.connection, None, None, None
            if connection is None:
                return
            self.generation += 1  # receipts from this connection settle nothing from now on
        raw = connection._connection  # Kombu swallows errors while closing; the socket may stay open
        try:
            connection.release()
        except Exception as exc:  # a broken connection: there is nothing more to say to it
            logger.debug("closing a broken connection to %s: %s", mask(self.broker.url), exc)
        if getattr(raw, "_transport", None) is not None and hasattr(raw, "collect"):
            with contextlib.suppress(Exception):
                raw.collect()  # py-amqp: close the socket without talking

    def errors(self, doing: str, error: type[TransportError] = TransportError, *, drop: bool = True) -> _Errors:
        """The boundary: a driver error becomes ``error`` (ours pass) and, with ``drop``, drops the connection."""
        return _Errors(self, doing, error, drop)

    def write(self, frames: bytes) -> None:
        """Write whole frames built elsewhere (``_kombu_wire``) at once, under the write lock.

        Raises a driver error if there is no connection (it was dropped) or the socket fails.
        """
        connection = self.connection
        if connection is None:
            raise amqp.exceptions.RecoverableConnectionError("connection already closed")
        raw = connection.connection
        with self.write_lock:
            raw.transport.write(frames)
        raw.bytes_sent += 1

    def fresh_channel(self) -> Any:
        """A new channel on the connection, for calls that may close it (passive declares)."""
        self.channel  # noqa: B018 - connects
        assert self.connection is not None
        return self.connection.channel()

    def exists(self, kind: str, name: str) -> bool:
        """Whether an exchange or queue exists (a passive declare on a channel of its own)."""
        channel = self.fresh_channel()
        try:
            if kind == "exchange":
                channel.exchange_declare(name, "fanout", passive=True)
            else:
                channel.queue_declare(name, passive=True)
        except amqp.exceptions.NotFound:
            return False
        finally:
            _close(channel)
        return True

    def depths(self, names: Sequence[str]) -> list[int | None]:
        """Messages ready in each queue, None for one that does not exist.

        One passive declare each, on one channel of its own; reads no message. A missing queue
        makes the broker close the channel, which py-amqp opens again before raising, so the
        next declare goes on the same channel.
        """
        found: list[int | None] = []
        channel = self.fresh_channel()
        try:
            for name in names:
                try:
                    found.append(int(channel.queue_declare(name, passive=True).message_count))
                except amqp.exceptions.NotFound:
                    found.append(None)
        finally:
            _close(channel)
        return found


class _Errors:
    """:meth:`Link.errors`: a class rather than a generator, as every publish and receive enters
    it; the message and ``boundary`` are made only when a driver error comes through."""

    __slots__ = ("doing", "drop", "error", "link")

    def __init__(self, link: Link, doing: str, error: type[TransportError], drop: bool) -> None:
        self.link, self.doing, self.error, self.drop = link, doing, error, drop

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, trace: Any) -> None:
        if exc is None or isinstance(exc, HedwigError) or not isinstance(exc, DRIVER_ERRORS):
            return
        if self.drop:
            self.link.reset()
        with boundary(f"{self.doing} on {mask(self.link.broker.url)}", DRIVER_ERRORS, error=self.error):
            raise exc.with_traceback(trace)


def chunked(connection: Any) -> Any:
    """The py-amqp connection's transport if it reads in chunks (plain TCP), else None (TLS)."""
    transport = connection.transport
    return transport if type(transport) is _ChunkedTCPTransport else None


def _connection(url: str, connect_timeout_s: float) -> kombu.Connection:
    """A Kombu connection to ``url``, reading in chunks unless it is TLS or lists several brokers."""
    if ";" in url:  # failover: Kombu picks the broker
        return kombu.Connection(url, connect_timeout=connect_timeout_s)
    params: dict[str, Any] = {**parse_url(url), "connect_timeout": connect_timeout_s}
    if params["transport"] in ("amqp", "pyamqp"):  # TLS (amqps) keeps py-amqp's own reader
        params["transport"] = _KombuTransport
    return kombu.Connection(**params)


class _ChunkedTCPTransport(amqp.transport.TCPTransport):  # type: ignore[misc]
    """py-amqp's TCP transport, reading the socket a chunk at a time.

    py-amqp reads each frame's header, payload and end byte with a ``recv`` of its own: nine
    system calls per message, each letting other threads take the GIL. This reads whatever has
    arrived (up to ``READ_CHUNK`` bytes) and keeps the rest for the next frames, as py-amqp
    keeps a partial frame; and sets no socket timeout to read a frame already in hand.
    """

    _read_buffer: bytes  # what arrived and was not read yet; py-amqp's, from the start of a frame

    def _read(self, n: int, initial: bool = False, _errnos: tuple[int, ...] = (errno.EAGAIN, errno.EINTR)) -> bytes:
        buffered = self._read_buffer
        try:
            while len(buffered) < n:
                try:
                    chunk = self.sock.recv(max(n - len(buffered), READ_CHUNK))
                except OSError as exc:
                    if exc.errno not in _errnos:
                        raise
                    if initial and self.raise_on_initial_eintr:
                        raise TimeoutError from exc
                    continue
                if not chunk:
                    raise OSError("Server unexpectedly closed connection")
                buffered += chunk
        except BaseException:
            self._read_buffer = buffered
            raise
        result, self._read_buffer = buffered[:n], buffered[n:]
        return result

    def buffered_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame, ``(type, channel, payload)``, if all of it already arrived; else None.

        Deliveries arrive back to back: most frames are read from what one ``recv`` brought,
        without py-amqp's three reads, socket timeout and buffer copies per frame. Anything
        unusual (a partial frame, a bad frame end) is left to ``read_frame``, which says so.
        """
        buffered = self._read_buffer
        if len(buffered) < 8:
            return None
        frame_type, channel, size = _FRAME_HEADER.unpack_from(buffered)
        end = size + 7
        if len(buffered) <= end or buffered[end] != _FRAME_END:
            return None
        self._read_buffer = buffered[end + 1 :]
        return frame_type, channel, buffered[7:end]

    def buffered_delivery(self, channel: int) -> tuple[bytes, bytes, bytes] | None:
        """A ``basic.deliver`` on ``channel`` that arrived whole at the front of what was read: its
        method and content header payloads and its body. None (nothing taken) for anything else,
        which py-amqp's reader then takes frame by frame."""
        buffered = self._read_buffer
        method, at = _payload(buffered, 0, 1, channel)
        if method is None or method[:4] != DELIVER:
            return None
        header, at = _payload(buffered, at, 2, channel)
        if header is None or len(header) < 14:
            return None
        size = int.from_bytes(header[4:12], "big")
        pieces: list[bytes] = []
        while size > 0:
            piece, at = _payload(buffered, at, 3, channel)
            if piece is None or not piece:
                return None
            pieces.append(piece)
            size -= len(piece)
        self._read_buffer = buffered[at:]
        return method, header, pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def holding(self) -> bool:
        """Whether anything read is still to be handled (a frame, or part of one)."""
        return bool(self._read_buffer)

    def fill(self) -> bool:
        """Take whatever arrived on the socket since, without waiting; False if nothing had."""
        try:
            chunk = self.sock.recv(READ_CHUNK, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        if not chunk:
            raise OSError("Server unexpectedly closed connection")
        self._read_buffer += chunk
        return True

    def next_frame(self, timeout_s: float) -> tuple[int, int, bytes]:
        """The next frame, waiting up to ``timeout_s`` for it (``TimeoutError`` if it does not come).

        Waits with ``poll`` and reads with the socket left blocking: no socket timeout set and
        unset per read. A whole frame with a bad end goes to py-amqp's ``read_frame``, which raises.
        """
        frame = self.buffered_frame()
        while frame is None:
            buffered = self._read_buffer
            wanted = int.from_bytes(buffered[3:7], "big") + 8 if len(buffered) >= 7 else 8
            if len(buffered) >= wanted:
                return self.read_frame()  # type: ignore[no-any-return]
            if not self._poller().poll(max(timeout_s, 0.0) * 1000):
                raise TimeoutError(f"no frame within {timeout_s:g}s")
            chunk = self.sock.recv(max(wanted - len(buffered), READ_CHUNK))
            if not chunk:
                raise OSError("Server unexpectedly closed connection")
            self._read_buffer = buffered + chunk
            frame = self.buffered_frame()
        return frame

    def _poller(self) -> Any:
        poller = getattr(self, "_poll", None)
        if poller is None:
            poller = self._poll = select.poll()
            poller.register(self.sock, select.POLLIN)
        return poller

    @contextlib.contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[Any]:
        buffered = self._read_buffer
        if timeout is not None and len(buffered) >= 7:
            size = int.from_bytes(buffered[3:7], "big")
            if len(buffered) >= size + 8:  # a whole frame: reading it touches no socket
                yield self.sock
                return
        with super().having_timeout(timeout) as sock:
            yield sock


def _payload(buffered: bytes, at: int, frame_type: int, channel: int) -> tuple[bytes | None, int]:
    """The payload of the whole frame of ``frame_type`` on ``channel`` at ``at``, and where the next
    frame starts; None if the frame there is another, partial or ends badly."""
    if len(buffered) < at + 7:
        return None, at
    kind, on, size = _FRAME_HEADER.unpack_from(buffered, at)
    end = at + 7 + size
    if kind != frame_type or on != channel or len(buffered) <= end or buffered[end] != _FRAME_END:
        return None, at
    return buffered[at + 7 : end], end + 1


class _AMQPConnection(kombu.transport.pyamqp.Connection):  # type: ignore[misc]
    def blocking_read(self, timeout: float | None = None) -> Any:
        """py-amqp's, taking a frame already in hand without setting a socket timeout."""
        transport = self.transport
        frame = transport.buffered_frame() if type(transport) is _ChunkedTCPTransport else None
        if frame is None:
            return super().blocking_read(timeout)
        return self.on_inbound_frame(frame)

    def Transport(
        self,
        host: str,
        connect_timeout: float | None,
        ssl: Any = False,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        if ssl:
            return super().Transport(host, connect_timeout, ssl, read_timeout, write_timeout, **kwargs)
        return _ChunkedTCPTransport(
            host, connect_timeout=connect_timeout, read_timeout=read_timeout, write_timeout=write_timeout, **kwargs
        )


class _KombuTransport(kombu.transport.pyamqp.Transport):  # type: ignore[misc]
    """Kombu's py-amqp transport with connections that read in chunks."""

    Connection = _AMQPConnection


class _Wire:
    """A plain TCP connection's socket (a ``_ChunkedTCPTransport``'s) as the publisher writes and
    reads it (see ``Confirms``): whole buffers out under the write lock, frames in from the chunked
    reader, and every frame the publisher does not take handed to py-amqp's own handler."""

    def __init__(self, connection: Any, channel_id: int, write_lock: threading.Lock) -> None:
        self._connection = connection  # py-amqp's
        self._transport = connection.transport
        self.channel_id = channel_id
        self._write_lock = write_lock
        self.next_frame: Callable[[float], tuple[int, int, bytes]] = self._transport.next_frame

    @property
    def frame_max(self) -> int:
        return int(self._connection.frame_max)

    def write(self, data: bytes) -> None:
        with self._write_lock:
            self._transport.write(data)
        self._connection.bytes_sent += 1

    def dispatch(self, frame: tuple[int, int, bytes]) -> None:
        self._connection.on_inbound_frame(frame)


def _locked(write: Callable[..., Any], lock: threading.Lock) -> Callable[..., Any]:
    """py-amqp's frame writer, one frame at a time under ``lock``."""

    def write_frame(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return write(*args, **kwargs)

    return write_frame


def _close(channel: Any) -> None:
    """Close a channel of a passive declare. One the broker closed is already open again (py-amqp
    revives it): left open, each would hold a channel number until the connection runs out of them."""
    with contextlib.suppress(*DRIVER_ERRORS):
        channel.close()
