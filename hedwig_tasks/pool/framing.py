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


def write_frame(fd: int, header: dict[str, Any], body: bytes = b"") -> None:
    """Write one frame to ``fd`` (blocking). Raises ``OSError`` (``BrokenPipeError``) if the reader is gone."""
    head = json.dumps(header, separators=(",", ":")).encode()
    view = memoryview(_LENGTHS.pack(len(head), len(body)) + head + body)
    while view:
        view = view[os.write(fd, view) :]


def read_frame(fd: int) -> tuple[dict[str, Any], bytes] | None:
    """The next frame from ``fd`` (blocking): its header and body; None at end of file."""
    lengths = _read_exact(fd, _LENGTHS.size)
    if lengths is None:
        return None
    head_size, body_size = _LENGTHS.unpack(lengths)
    head = _read_exact(fd, head_size)
    body = _read_exact(fd, body_size) if body_size else b""
    if head is None or body is None:
        return None
    header: dict[str, Any] = json.loads(head)
    return header, body


def wait_readable(fd: int, timeout_s: float | None) -> bool:
    """Whether ``fd`` has something to read (or end of file) within ``timeout_s`` (None: forever)."""
    if timeout_s is None:
        return True  # the read itself waits
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(max(0.0, timeout_s) * 1000))


def _read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``; None if it ends first."""
    chunk = os.read(fd, size)
    if len(chunk) == size:
        return chunk
    parts = [chunk]
    got = len(chunk)
    while got < size:
        if not chunk:
            return None
        chunk = os.read(fd, size - got)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
