"""A process-pool child: ``python -m hedwig_tasks.pool.child --in FD --out FD [--app SPEC] ...``.

The child builds its own app from the same ``-A``/``--settings`` spec as the worker (so its
publishes go through its own transport), says it is ready, then runs one task per frame
until its input ends: decode and validate the delivery with its app, run the handler, ask the
handler's retry policy, and answer with the outcome as JSON. Its next task may wait in the pipe
while it runs one. Each reply is written as its task ends, never held to go with the next
one's: the worker would not know the first had ended while the next runs (its ack waits, and
the time limit it watches is the first's), and held replies saved no measurable CPU on a no-op
handler (``bench/pool.py``). With ``--max-memory-kb`` it stops after a task that left its peak memory
above the limit, saying so in that task's reply (the worker sends any task still waiting in
its pipe to the next child). It ignores SIGINT and SIGTERM: the worker decides when it stops
(by closing its input, once the running message is done).
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
from hedwig_tasks.pool.framing import ACK_REPLY, FrameReader, frame_of, write_frame
from hedwig_tasks.retry import decide
from hedwig_tasks.transports.base import Delivery

__all__ = ["error_kind", "main", "run_task"]

logger = logging.getLogger(__name__)


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
    try:
        while (frame := reader.read()) is not None:
            reply = run_task(app, *frame, loop)
            if max_memory_kb is None:
                write_reply(fd_out, reply)
                continue
            rss_kb = reply["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if rss_kb > max_memory_kb:
                reply["retire"] = True  # what waits in the pipe goes to the next child
                write_frame(fd_out, reply)
                return
            write_frame(fd_out, reply)
    finally:
        loop.close()


def write_reply(fd: int, reply: dict[str, Any]) -> None:
    """Write ``reply``; the usual one (acknowledge, no error) without the JSON encoder."""
    if reply["action"] == "ack" and len(reply) == 4 and not reply["reason"]:
        head = b"%s%r}" % (ACK_REPLY, reply["duration_s"])  # read back by framing.decode_header
        os.write(fd, frame_of(head))  # a few dozen bytes: one write takes it whole
    else:
        write_frame(fd, reply)


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
