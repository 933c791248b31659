"""A process-pool child: ``python -m hedwig_tasks.pool.child --in FD --out FD [--app SPEC] ...``.

The child builds its own app from the same ``-A``/``--settings`` spec as the worker (so its
publishes go through its own transport), says it is ready, then runs one task per frame
until its input ends: decode and validate the delivery with its app, run the handler, ask the
handler's retry policy, and answer with the outcome as JSON. Its next tasks may wait in the
pipe while it runs one.

A reply is written as its task ends, except after a quick run (under :data:`HOLD_S`) when the
next task was read already: then it waits to go in one write with the next ones (for
:data:`HOLD_S` from the oldest while runs stay quick), and never while the child waits for
work. Each write wakes the worker, and on a small virtual machine a wake-up costs about what a
quick run does (``bench/pool.py``: about a third fewer wake-ups per no-op message). Neither the
reply of a task with a time limit nor the one before such a task waits: the worker times a
task from the reply before it. What it costs: a held acknowledgement waits for the run after
it, however long that run turns out to be, and if the child dies in that run, the held ones
count as lost with it and run again (at least once delivery).

With ``--max-memory-kb`` it stops after a task that left its peak memory above the limit,
saying so in that task's reply (the worker sends any task still waiting in its pipe to the next
child). It ignores SIGINT and SIGTERM: the worker decides when it stops (by closing its input,
once the running message is done).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from hedwig_tasks.app import Hedwig
from hedwig_tasks.exceptions import (
    DeadLetter,
    DecodeError,
    HandlerControl,
    HandlerNotFound,
    Ignore,
    Retry,
    TimeLimitExceeded,
)
from hedwig_tasks.pool.children import TRANSPORT_ENV
from hedwig_tasks.pool.framing import ACK_REPLY, FrameReader, encode_frame, frame_of, write_all, write_frame
from hedwig_tasks.retry import decide
from hedwig_tasks.transports.base import Delivery

__all__ = ["HOLD_S", "error_kind", "main", "run_task", "serve"]

logger = logging.getLogger(__name__)

#: A run shorter than this (seconds) may have its reply wait to go with the next ones, for at
#: most this long from the oldest held.
HOLD_S = 0.002


def error_kind(error: BaseException) -> str:
    """How the parent rebuilds an error: ``ignore``, ``dead_letter``, ``retry``, ``time_limit`` or ``error``."""
    if isinstance(error, Ignore):
        return "ignore"
    if isinstance(error, DeadLetter):
        return "dead_letter"
    if isinstance(error, Retry):
        return "retry"
    if isinstance(error, TimeLimitExceeded):
        return "time_limit"
    return "control" if isinstance(error, HandlerControl) else "error"


def _describe_error(error: BaseException) -> dict[str, Any]:
    kind = error_kind(error)
    described: dict[str, Any] = {"kind": kind, "type": type(error).__qualname__, "text": str(error)}
    if kind == "error":
        described["traceback"] = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    if isinstance(error, Retry):
        described["delay_s"] = error.delay_s
    if isinstance(error, TimeLimitExceeded):
        described["time_limit_s"] = error.time_limit_s
    return described


def run_task(app: Hedwig, header: dict[str, Any], body: bytes, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """Decode, run and decide one task; the reply (``action``, ``delay_s``, ``reason``, ``error``...)."""
    delivery = Delivery(body, header["attrs"], header["attempt"], None, header["sub"], header.get("id", ""))
    try:
        message = app.decode(delivery)
        handler = app.handler_for(message)
    except (DecodeError, HandlerNotFound) as exc:  # the worker read it; a different app here would not
        return {"action": "dead_letter", "delay_s": 0.0, "reason": f"child process: {exc}", "duration_s": 0.0}
    error: Exception | None = None
    started = time.perf_counter()
    try:
        handler.run(message, loop=loop if handler.is_async else None, time_limit_s=header.get("limit"))
    except Exception as exc:
        error = exc
    duration_s = time.perf_counter() - started
    outcome = decide(handler.retry_policy, error, delivery.attempt)
    reply: dict[str, Any] = {
        "action": outcome.action,
        "delay_s": outcome.delay_s,
        "reason": outcome.reason,
        "duration_s": duration_s,
    }
    if error is not None:
        reply["error"] = _describe_error(error)
    return reply


def serve(app: Hedwig, fd_in: int, fd_out: int, max_memory_kb: int | None = None) -> None:
    """Answer tasks until the input ends, or until one leaves the peak memory above ``max_memory_kb``."""
    loop = asyncio.new_event_loop()
    reader = FrameReader(fd_in)
    replies = _Replies(fd_out)
    try:
        frame = reader.read()
        while frame is not None:
            reply = run_task(app, *frame, loop)
            if max_memory_kb is not None:
                rss_kb = reply["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                if rss_kb > max_memory_kb:
                    reply["retire"] = True  # what waits in the pipe goes to the next child
                    replies.add(reply)
                    replies.flush()
                    return
            following = reader.read() if reader.has_frame() else None  # read already: no waiting
            replies.add(reply)
            if following is None or not replies.may_wait(reply, frame[0], following[0]):
                replies.flush()  # never held while this child waits for work
            frame = following if following is not None else reader.read()
    finally:
        loop.close()


class _Replies:
    """Replies not yet written: a quick run's waits to go with the next ones (see the module's doc)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.held: list[bytes] = []
        self.since = 0.0  #: when the oldest held one was made

    def add(self, reply: dict[str, Any]) -> None:
        if not self.held:
            self.since = time.perf_counter()
        if reply["action"] == "ack" and len(reply) == 4 and not reply["reason"]:  # the usual one, without json
            self.held.append(frame_of(b"%s%r}" % (ACK_REPLY, reply["duration_s"])))  # framing.decode_header reads it
        else:
            self.held.append(encode_frame(reply))

    def may_wait(self, reply: dict[str, Any], task: dict[str, Any], following: dict[str, Any]) -> bool:
        """Whether ``reply`` (of ``task``) may wait for the run of the ``following`` task, read already."""
        quick = reply["duration_s"] < HOLD_S and time.perf_counter() - self.since < HOLD_S
        return quick and "limit" not in task and "limit" not in following  # the worker times each from the last reply

    def flush(self) -> None:
        if self.held:
            data = self.held[0] if len(self.held) == 1 else b"".join(self.held)
            self.held.clear()
            write_all(self.fd, data)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hedwig_tasks.pool.child")
    parser.add_argument("--in", dest="fd_in", type=int, required=True)
    parser.add_argument("--out", dest="fd_out", type=int, required=True)
    parser.add_argument("--app")
    parser.add_argument("--settings")
    parser.add_argument("--loglevel", default="WARNING")
    parser.add_argument("--max-memory-kb", type=int)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = _parse(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s")
    from hedwig_tasks._cli_app import CLIError, find_app  # the CLI's own way of finding the app

    try:
        app = find_app(args.app, args.settings)
        transport = os.environ.get(TRANSPORT_ENV)
        if transport:  # the worker's own URL, --transport included
            app._transport_spec, app._transport = transport, None
    except (CLIError, Exception) as exc:  # any failure to build the app is the worker's start-up error
        write_frame(args.fd_out, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    gc.freeze()  # the app's imports stay out of every collection from here on
    write_frame(args.fd_out, {"ready": os.getpid()})
    try:
        serve(app, args.fd_in, args.fd_out, args.max_memory_kb)
    except BrokenPipeError:  # the worker is gone
        return 0
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
