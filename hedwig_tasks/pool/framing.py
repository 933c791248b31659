"""Frames between a worker and its child processes: a JSON header and raw bytes, over a pipe.

A frame is 8 bytes (the header's length and the body's, big-endian), the header as UTF-8
JSON, then the body as it is. A task carries the delivery's body and its string attributes;
a reply carries the outcome as JSON. Nothing is pickled: a child reads only bytes, strings
and numbers, whatever a message holds.

Two headers skip JSON, as they come once per message (:func:`decode_header` reads all three
kinds): a task's is its strings joined by NUL characters, after one (:func:`task_header`;
JSON when a string holds a NUL), and a child's usual reply is :data:`ACK_REPLY` and the run
time.

A pipe may hold several frames at once (the worker sends a child its next task before the
current one's reply, and a child's replies pile up while the worker is busy): :class:`FrameReader`
keeps what one read took past a frame for the next, and :meth:`FrameReader.read_some` takes
every whole frame one read brings.
"""

from __future__ import annotations

import json
import os
import select
import struct
from typing import Any

__all__ = [
    "ACK_REPLY",
    "FrameReader",
    "decode_header",
    "encode_frame",
    "frame_of",
    "read_frame",
    "task_header",
    "wait_readable",
    "write_frame",
]

_LENGTHS = struct.Struct(">II")
#: What one read asks for, in bytes: a whole frame or two, usually.
_READ_SIZE = 65536
_decode = json.JSONDecoder().decode
#: How a child's usual reply (acknowledge, no error) starts; its run time in seconds and ``}``
#: follow. Written and read without the JSON encoder and decoder.
ACK_REPLY = b'{"action":"ack","duration_s":'
#: json's C encoder, made once: ``JSONEncoder.encode`` makes one per call (about half of a task
#: header's ~4 us). Compact, ASCII, no check for cycles (a header is strings, numbers and dicts
#: of them).
_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_chunks = _encoder and _encoder(
    None, None, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
)


def _encode(header: dict[str, Any]) -> str:
    if _encode_chunks is None:  # a Python without json's C speedups
        return json.dumps(header, separators=(",", ":"))
    return "".join(_encode_chunks(header, 0))


def task_header(subscription: str, attempt: int, transport_id: str, limit_s: float | None, attributes: Any) -> bytes:
    """A task's header: ``NUL sub NUL attempt NUL id NUL limit (NUL key NUL value)...`` (the
    limit empty when there is none), or the same as JSON if a string holds a NUL."""
    fields = [subscription, str(attempt), transport_id, "" if limit_s is None else repr(limit_s)]
    for item in attributes.items():
        fields += item
    try:
        text = "\0" + "\0".join(fields)
    except TypeError:  # not all strings: JSON says what it can
        text = ""
    if text.count("\0") != len(fields):
        header = {"sub": subscription, "attempt": attempt, "id": transport_id, "attrs": dict(attributes)}
        if limit_s is not None:
            header["limit"] = limit_s
        text = _encode(header)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate (a header py-amqp read leniently) kept


def decode_header(head: bytes) -> dict[str, Any]:
    """A frame's header: JSON, a task's NUL-joined strings (:func:`task_header`) or a child's
    usual reply (:data:`ACK_REPLY`)."""
    if head[:1] == b"\0":
        fields = iter(head.decode("utf-8", "surrogatepass").split("\0"))
        next(fields)
        subscription, attempt, transport_id, limit_s = next(fields), next(fields), next(fields), next(fields)
        attributes = dict(zip(fields, fields, strict=True))  # key, value, key, value...
        task = {"sub": subscription, "attempt": int(attempt), "id": transport_id, "attrs": attributes}
        if limit_s:
            task["limit"] = float(limit_s)
        return task
    if head.startswith(ACK_REPLY):
        try:
            return {"action": "ack", "duration_s": float(head[len(ACK_REPLY) : -1])}
        except ValueError:  # more than the run time follows: JSON after all
            pass
    header: dict[str, Any] = _decode(head.decode())
    return header


def encode_frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    """One frame's bytes."""
    return frame_of(_encode(header).encode(), body)


def frame_of(head: bytes, body: bytes = b"") -> bytes:
    """One frame's bytes, its header already JSON (UTF-8)."""
    return _LENGTHS.pack(len(head), len(body)) + head + body


def write_frame(fd: int, header: dict[str, Any], body: bytes = b"") -> None:
    """Write one frame to ``fd`` (blocking). Raises ``OSError`` (``BrokenPipeError``) if the reader is gone."""
    write_all(fd, encode_frame(header, body))


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd`` (blocking): what is past the pipe's buffer goes as the reader takes it."""
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]


class FrameReader:
    """Frames from one file descriptor, in order, however the reads cut them. Not thread-safe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._data = b""

    def buffered(self) -> bool:
        """Whether bytes of a next frame were already read (so waiting on ``fd`` would be wrong)."""
        return bool(self._data)

    def has_frame(self) -> bool:
        """Whether a whole next frame was already read (:meth:`read` returns it without waiting)."""
        data = self._data
        if len(data) < _LENGTHS.size:
            return False
        head_size: int
        body_size: int
        head_size, body_size = _LENGTHS.unpack_from(data)
        return len(data) >= _LENGTHS.size + head_size + body_size

    def read(self) -> tuple[dict[str, Any], bytes] | None:
        """The next frame (blocking): its header and body; None at end of file."""
        data = self._fill(self._data, _LENGTHS.size)
        if data is None:
            return None
        head_size, body_size = _LENGTHS.unpack_from(data)
        end = _LENGTHS.size + head_size + body_size
        data = self._fill(data, end)
        if data is None:
            return None
        self._data = data[end:]
        return decode_header(data[_LENGTHS.size : _LENGTHS.size + head_size]), data[_LENGTHS.size + head_size : end]

    def read_some(self) -> list[tuple[dict[str, Any], bytes]] | None:
        """The whole frames one read brings (call once ``fd`` is readable), perhaps none yet; None
        at end of file."""
        try:
            chunk = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:  # a non-blocking fd with nothing yet
            return []
        if not chunk:
            self._data = b""
            return None
        data = self._data + chunk if self._data else chunk
        frames, start, size = [], 0, len(data)
        while size - start >= _LENGTHS.size:
            head_size, body_size = _LENGTHS.unpack_from(data, start)
            head_at = start + _LENGTHS.size
            end = head_at + head_size + body_size
            if end > size:
                break
            frames.append((decode_header(data[head_at : head_at + head_size]), data[head_at + head_size : end]))
            start = end
        self._data = data[start:]
        return frames

    def _fill(self, data: bytes, size: int) -> bytes | None:
        """``data`` and what ``fd`` has next, up to ``size`` bytes at least; None if it ends first."""
        while len(data) < size:
            chunk = os.read(self.fd, max(_READ_SIZE, size - len(data)))
            if not chunk:
                self._data = b""
                return None
            data += chunk
        return data


def read_frame(fd: int) -> tuple[dict[str, Any], bytes] | None:
    """One frame from ``fd`` where nothing follows it unread (a reader of its own is kept otherwise)."""
    reader = FrameReader(fd)
    frame = reader.read()
    if reader.buffered():
        raise ValueError("more than one frame came: read them with a FrameReader")
    return frame


def wait_readable(fd: int, timeout_s: float | None) -> bool:
    """Whether ``fd`` has something to read (or end of file) within ``timeout_s`` (None: forever)."""
    if timeout_s is None:
        return True  # the read itself waits
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(max(0.0, timeout_s) * 1000))
