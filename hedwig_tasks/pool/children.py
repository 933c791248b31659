"""A process-pool child as the worker sees it: how to start one, its pipes and the tasks it holds.

:class:`Child` is one ``python -m hedwig_tasks.pool.child`` process (:mod:`~hedwig_tasks.pool.child`),
its input pipe (non-blocking: what does not fit waits in its outbox) and reply pipe, and the
tasks it was sent and has not answered, in order. :class:`Task` is a delivery as a frame
(:mod:`~hedwig_tasks.pool.framing`) with its limits and whom to tell of its end;
:func:`outcome_of` rebuilds what a child answered, never unpickling anything. Only the pool's
dispatcher (:mod:`~hedwig_tasks.pool.processes`) touches a child once the pool runs.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hedwig_tasks.exceptions import (
    ConfigurationError,
    DeadLetter,
    Ignore,
    RemoteError,
    Retry,
    TimeLimitExceeded,
)
from hedwig_tasks.pool.framing import FrameReader, frame_of, task_header, wait_readable
from hedwig_tasks.retry import ACK, Outcome, decide
from hedwig_tasks.transports.base import Delivery

if TYPE_CHECKING:
    from hedwig_tasks._worker_options import WorkerOptions
    from hedwig_tasks.app import Hedwig
    from hedwig_tasks.handler import Handler

__all__ = ["Child", "ChildSpec", "Done", "Task", "child_spec", "find_spec", "outcome_of"]

#: Longest a child may take to import the app and say it is ready, in seconds.
DEFAULT_START_TIMEOUT_S = 60.0
#: How long after its time limit a child whose ``async`` handler did not let itself be
#: cancelled (it blocks its event loop) is killed, in seconds.
ASYNC_CANCEL_GRACE_S = 1.0
#: The variable that hands a child the worker's transport URL (out of its command line, which
#: ``ps`` shows).
TRANSPORT_ENV = "HEDWIG_POOL_TRANSPORT"

#: What a task's end is told: the error (or None), the run time in seconds, the outcome, and the
#: pid of the child that died or was killed running it (None otherwise). Called on the dispatcher.
Done = Callable[[Exception | None, float, Outcome, int | None], None]


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """How to start a child: the app (``-A``) or settings module, a transport URL override, its
    log level, and the peak memory past which it retires (KiB)."""

    app: str | None = None
    settings: str | None = None
    transport: str | None = dataclasses.field(default=None, repr=False)
    loglevel: str = "WARNING"
    max_memory_kb: int | None = None

    def command(self, fd_in: int, fd_out: int) -> list[str]:
        command = [sys.executable, "-m", "hedwig_tasks.pool.child", "--in", str(fd_in), "--out", str(fd_out)]
        for option, value in (("--app", self.app), ("--settings", self.settings)):
            if value:
                command += [option, value]
        if self.max_memory_kb is not None:
            command += ["--max-memory-kb", str(self.max_memory_kb)]
        return [*command, "--loglevel", self.loglevel]


class Task:
    """A delivery for a child: its frame, its limits, and who is told of its end."""

    __slots__ = (
        "attempt",
        "done",
        "frame",
        "kill_after_s",
        "policy",
        "seat",
        "started_at",
        "time_limit_s",
        "transport_id",
    )

    def __init__(self, delivery: Delivery, handler: Handler, time_limit_s: float | None, done: Done) -> None:
        self.time_limit_s = time_limit_s
        self.kill_after_s: float | None = None
        if time_limit_s is not None:
            self.kill_after_s = time_limit_s + (ASYNC_CANCEL_GRACE_S if handler.is_async else 0.0)
        head = task_header(
            delivery.subscription, delivery.attempt, delivery.transport_id, time_limit_s, delivery.attributes
        )
        self.frame = frame_of(head, delivery.body)
        self.policy = handler.retry_policy
        self.attempt = delivery.attempt
        self.transport_id = delivery.transport_id
        self.done = done
        self.seat: Any = None
        self.started_at = 0.0  #: when its child began it (the reply before it came), once first in line

    @property
    def deadline(self) -> float:
        return math.inf if self.kill_after_s is None else self.started_at + self.kill_after_s

    def fail(self, error: Exception, pid: int | None = None) -> None:
        """Tell ``done`` the task failed with ``error``, decided by its handler's retry policy."""
        outcome = decide(self.policy, error, self.attempt)
        duration_s = time.monotonic() - self.started_at if self.started_at else 0.0
        self.done(error, duration_s, outcome, pid)


class Child:
    """One child process, its pipes, and the tasks it was sent and has not answered, in order.

    Only the dispatcher touches it once the pool runs.
    """

    def __init__(self, spec: ChildSpec, seat: Any = None) -> None:
        self.spec = spec
        self.seat = seat  #: the pool's seat it was started for
        self.tasks = 0  #: tasks it has answered
        self.sent = 0  #: tasks it was sent
        self.rss_kb = 0  #: its peak resident memory, as it last reported, in KiB (with --max-memory-per-child)
        self.ready = False  #: it has built its app and said so
        self.accepting = True  #: it takes more tasks (False once worn out, dead or stopping)
        self.why = ""  #: why it stopped taking tasks
        self.killed: Task | None = None  #: the task it was killed for passing its time limit
        self.dying = False  #: it was killed, or said it cannot start: its pipe's end is awaited
        self.waiting: collections.deque[Task] = collections.deque()  #: sent and not answered
        self.outbox: collections.deque[memoryview] = collections.deque()  #: bytes its pipe had no room for
        self.started = time.monotonic()
        task_r, self.task_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        self.reader = FrameReader(self.reply_r)
        env = dict(os.environ)
        if spec.transport:
            env[TRANSPORT_ENV] = spec.transport
        try:
            self.process = subprocess.Popen(
                spec.command(task_r, reply_w), pass_fds=(task_r, reply_w), stdin=subprocess.DEVNULL, env=env
            )
        except BaseException:
            os.close(self.task_w)
            os.close(self.reply_r)
            raise
        finally:
            os.close(task_r)
            os.close(reply_w)
        os.set_blocking(self.task_w, False)
        self.pid = self.process.pid

    def wait_ready(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Wait for the child to have built its app; ``ConfigurationError`` with its reason if it could not."""
        frame = self.reader.read() if wait_readable(self.reply_r, timeout_s) else None
        if frame is None or "ready" not in frame[0]:
            self.kill()
            why = frame[0].get("error") if frame else f"no answer in {timeout_s:g}s (exit code {self.process.poll()})"
            raise ConfigurationError(f"a process-pool child could not load the app: {why}")
        self.ready = True

    @property
    def deadline(self) -> float:
        """When it is killed unless it answers first: its start-up's limit, or its running task's."""
        if self.dying:
            return math.inf
        if not self.ready:
            return self.started + DEFAULT_START_TIMEOUT_S
        return self.waiting[0].deadline if self.waiting else math.inf

    def flush(self) -> bool:
        """Write what waits while its pipe has room; True once all is written (its input is closed
        then if it takes no more). A gone child's bytes are dropped (its pipe's end tells the rest)."""
        outbox = self.outbox
        try:
            while outbox:
                data = outbox[0]
                written = os.write(self.task_w, data)
                if written < len(data):
                    outbox[0] = data[written:]
                    return False
                outbox.popleft()
        except BlockingIOError:
            return False
        except OSError:
            outbox.clear()
        if not self.accepting:
            self.close_input()
        return True

    def close_input(self) -> None:
        """Close its input: it exits once it has answered what it read."""
        if self.task_w >= 0:
            os.close(self.task_w)
            self.task_w = -1

    def kill(self) -> None:
        """Kill the child at once (SIGKILL), reap it and close its pipes (start-up only)."""
        self.terminate()
        self.process.wait()
        self.close_input()
        if self.reply_r >= 0:
            os.close(self.reply_r)
            self.reply_r = -1

    def terminate(self) -> None:
        """SIGKILL the child: its reply pipe ends."""
        if self.process.poll() is None:
            try:
                self.process.kill()
            except ProcessLookupError:  # exited meanwhile
                pass

    def __repr__(self) -> str:
        return f"<Child pid={self.pid} tasks={self.tasks}>"


def child_spec(app: Hedwig, options: WorkerOptions) -> ChildSpec:
    """How children build ``app``: ``options.app_spec``, else where the app object is found among
    the imported modules, else ``options.settings_spec`` (Hedwig settings)."""
    spec = options.app_spec
    if spec is None and options.settings_spec is None:
        spec = find_spec(app)
    transport = app._transport_spec if isinstance(app._transport_spec, str) else None
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return ChildSpec(
        app=spec,
        settings=options.settings_spec,
        transport=transport,
        loglevel=level,
        max_memory_kb=options.max_memory_per_child_kb,
    )


def find_spec(app: Hedwig) -> str | None:
    """``"module:attribute"`` of an imported module's global that is ``app`` (``__main__`` left out)."""
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            if value is app:
                return f"{name}:{attribute}"
    return None


def outcome_of(reply: dict[str, Any]) -> tuple[Exception | None, float, Outcome]:
    """The error (rebuilt from its description, never unpickled), run time and outcome a child sent."""
    if len(reply) == 2 and reply["action"] == "ack":  # the usual one
        return None, reply["duration_s"], ACK
    outcome = Outcome(reply["action"], float(reply.get("delay_s", 0.0)), reply.get("reason", ""))
    described = reply.get("error")
    error: Exception | None = None
    if described is not None:
        kind, text = described["kind"], described.get("text", "")
        if kind == "ignore":
            error = Ignore(text)
        elif kind == "dead_letter":
            error = DeadLetter(text)
        elif kind == "retry":
            error = Retry(text, delay_s=described.get("delay_s"))
        elif kind == "time_limit":
            error = TimeLimitExceeded(float(described["time_limit_s"]))
        else:
            error = RemoteError(described["type"], text, described.get("traceback", ""))
    return error, float(reply.get("duration_s", 0.0)), outcome
