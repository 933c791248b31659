"""Frames between a worker and its child processes: a JSON header and raw bytes, over a pipe.

A frame is 8 bytes (the header's length and the body's, big-endian), the header as UTF-8
JSON, then the body as it is. A task carries the delivery's body and its string attributes;
a reply carries the outcome as JSON. Nothing is pickled: a child reads only bytes, strings
and numbers, whatever a message holds.
"""

from __future__ import annotations

import json
import os
import select
import struct
from typing import Any

__all__ = ["read_frame", "wait_readable", "write_frame"]

_LENGTHS = struct.Struct(">II")
#: What one read asks for, in bytes: a whole frame, usually.
_READ_SIZE = 65536


def write_frame(fd: int, header: dict[str, Any], body: bytes = b"") -> None:
    """Write one frame to ``fd`` (blocking). Raises ``OSError`` (``BrokenPipeError``) if the reader is gone."""
    head = json.dumps(header, separators=(",", ":")).encode()
    view = memoryview(_LENGTHS.pack(len(head), len(body)) + head + body)
    while view:
        view = view[os.write(fd, view) :]


def read_frame(fd: int) -> tuple[dict[str, Any], bytes] | None:
    """The next frame from ``fd`` (blocking): its header and body; None at end of file.

    One read takes the whole of a small frame: each side sends one frame and waits for the
    answer, so a read never finds the start of the next one.
    """
    data = _read_at_least(fd, b"", _LENGTHS.size)
    if data is None:
        return None
    head_size, body_size = _LENGTHS.unpack_from(data)
    end = _LENGTHS.size + head_size + body_size
    data = _read_at_least(fd, data, end)
    if data is None:
        return None
    if len(data) > end:
        raise ValueError(f"a frame of {end} bytes came with {len(data) - end} more: one frame at a time")
    header: dict[str, Any] = json.loads(data[_LENGTHS.size : _LENGTHS.size + head_size])
    return header, data[_LENGTHS.size + head_size :]


def wait_readable(fd: int, timeout_s: float | None) -> bool:
    """Whether ``fd`` has something to read (or end of file) within ``timeout_s`` (None: forever)."""
    if timeout_s is None:
        return True  # the read itself waits
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(max(0.0, timeout_s) * 1000))


def _read_at_least(fd: int, data: bytes, size: int) -> bytes | None:
    """``data`` and what ``fd`` has next, up to ``size`` bytes at least; None if it ends first."""
    while len(data) < size:
        chunk = os.read(fd, max(_READ_SIZE, size - len(data)))
        if not chunk:
            return None
        data += chunk
    return data
