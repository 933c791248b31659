"""The worker's side of a process-pool child: start it, hand it a delivery, read the outcome.

Each of the worker's handler threads owns one :class:`Child` and talks to it over a pair of
pipes (see :mod:`~hedwig_tasks.pool.framing`). The thread still does everything else a
handler thread does: leases, signals, settling; the child only decodes and runs the handler.
A child is a fresh interpreter (``python -m hedwig_tasks.pool.child``), never a fork of the
threaded worker, so it inherits no lock another thread held; it builds its app from the
worker's ``-A``/``--settings`` spec.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from hedwig_tasks.exceptions import (
    ConfigurationError,
    DeadLetter,
    Ignore,
    RemoteError,
    Retry,
    TimeLimitExceeded,
    WorkerLost,
)
from hedwig_tasks.pool.framing import read_frame, wait_readable, write_frame
from hedwig_tasks.retry import Outcome, decide
from hedwig_tasks.transports.base import Delivery

if TYPE_CHECKING:
    from hedwig_tasks._worker_options import WorkerOptions
    from hedwig_tasks.app import Hedwig
    from hedwig_tasks.handler import Handler

__all__ = ["Child", "ChildSpec", "Pool", "child_spec"]

logger = logging.getLogger(__name__)

#: Longest a child may take to import the app and say it is ready, in seconds.
DEFAULT_START_TIMEOUT_S = 60.0
#: How long a child that was told to stop may take to exit before it is killed, in seconds.
STOP_TIMEOUT_S = 5.0
#: How long after its time limit a child whose ``async`` handler did not let itself be
#: cancelled (it blocks its event loop) is killed, in seconds.
ASYNC_CANCEL_GRACE_S = 1.0
#: The variable that hands a child the worker's transport URL (out of its command line, which
#: ``ps`` shows).
TRANSPORT_ENV = "HEDWIG_POOL_TRANSPORT"


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    """How to start a child: the app (``-A``) or settings module, a transport URL override, its log level."""

    app: str | None = None
    settings: str | None = None
    transport: str | None = dataclasses.field(default=None, repr=False)
    loglevel: str = "WARNING"

    def command(self, fd_in: int, fd_out: int) -> list[str]:
        command = [sys.executable, "-m", "hedwig_tasks.pool.child", "--in", str(fd_in), "--out", str(fd_out)]
        for option, value in (("--app", self.app), ("--settings", self.settings)):
            if value:
                command += [option, value]
        return [*command, "--loglevel", self.loglevel]


class Child:
    """One child process and its pipes. Not thread-safe: one handler thread uses it."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.tasks = 0  #: tasks it has answered
        self.lost = False  #: it died or was killed during a task; a new child takes its place
        self.rss_kb = 0  #: its peak resident memory, as it last reported, in KiB
        task_r, self._task_w = os.pipe()
        self._reply_r, reply_w = os.pipe()
        env = dict(os.environ)
        if spec.transport:
            env[TRANSPORT_ENV] = spec.transport
        try:
            self.process = subprocess.Popen(
                spec.command(task_r, reply_w), pass_fds=(task_r, reply_w), stdin=subprocess.DEVNULL, env=env
            )
        finally:
            os.close(task_r)
            os.close(reply_w)
        self.pid = self.process.pid

    def wait_ready(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Wait for the child to have built its app; ``ConfigurationError`` with its reason if it could not."""
        frame = read_frame(self._reply_r) if wait_readable(self._reply_r, timeout_s) else None
        if frame is None or "ready" not in frame[0]:
            self.kill()
            why = frame[0].get("error") if frame else f"no answer in {timeout_s:g}s (exit code {self.process.poll()})"
            raise ConfigurationError(f"a process-pool child could not load the app: {why}")

    def run(self, delivery: Delivery, time_limit_s: float | None, kill_after_s: float | None) -> dict[str, Any]:
        """Hand ``delivery`` to the child and return its reply.

        ``time_limit_s`` goes to the child (an ``async`` handler cancels itself there);
        after ``kill_after_s`` with no reply the child is killed and :class:`TimeLimitExceeded`
        raised. :class:`WorkerLost` if the child dies first.
        """
        header = {
            "sub": delivery.subscription,
            "attempt": delivery.attempt,
            "id": delivery.transport_id,
            "attrs": delivery.attributes if isinstance(delivery.attributes, dict) else dict(delivery.attributes),
        }
        if time_limit_s is not None:
            header["limit"] = time_limit_s
        try:
            write_frame(self._task_w, header, delivery.body)
        except OSError:
            raise self._lost() from None
        return self._reply(time_limit_s, kill_after_s)

    def _reply(self, time_limit_s: float | None, kill_after_s: float | None) -> dict[str, Any]:
        if kill_after_s is not None and not wait_readable(self._reply_r, kill_after_s):
            self.lost = True
            self.terminate()
            self.process.wait()
            raise TimeLimitExceeded(time_limit_s or kill_after_s or 0.0)
        frame = read_frame(self._reply_r)
        if frame is None:
            raise self._lost()
        self.tasks += 1
        reply = frame[0]
        self.rss_kb = int(reply.get("rss_kb", 0))
        return reply

    def _lost(self) -> WorkerLost:
        self.lost = True
        code = self.process.wait()
        cause = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return WorkerLost(f"child process {self.pid} died ({cause})")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Let the child finish and exit (its input ends); kill it if it takes over ``timeout_s``."""
        self._close_pipes(reply=False)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.terminate()
        self.process.wait()
        self._close_pipes()

    def kill(self) -> None:
        """Kill the child at once (SIGKILL), reap it and close its pipes (from its own thread)."""
        self.terminate()
        self.process.wait()
        self._close_pipes()

    def terminate(self) -> None:
        """SIGKILL the child, from any thread: a read waiting on it ends (its pipe closes)."""
        if self.process.poll() is None:
            try:
                self.process.kill()
            except ProcessLookupError:  # exited meanwhile
                pass

    def _close_pipes(self, *, reply: bool = True) -> None:
        # each fd is closed once: a number closed twice may be another thread's by then
        if self._task_w >= 0:
            os.close(self._task_w)
            self._task_w = -1
        if reply and self._reply_r >= 0:
            os.close(self._reply_r)
            self._reply_r = -1

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
    return ChildSpec(app=spec, settings=options.settings_spec, transport=transport, loglevel=level)


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


class Pool:
    """The children of a worker's handler threads: started together, renewed one by one."""

    def __init__(self, spec: ChildSpec, options: WorkerOptions) -> None:
        self.spec = spec
        self.max_tasks = options.max_tasks_per_child
        self.max_memory_kb = options.max_memory_per_child_kb
        self._lock = threading.Lock()
        self._idle: list[Child] = []
        self._all: set[Child] = set()
        children = [self._new() for _ in range(options.concurrency)]
        try:
            for child in children:
                child.wait_ready()
        except BaseException:
            self.close()
            raise
        self._idle = children
        logger.info("process pool: %d children ready (pids %s)", len(children), ", ".join(str(c.pid) for c in children))

    def _new(self) -> Child:
        child = Child(self.spec)
        with self._lock:
            self._all.add(child)
        return child

    def take(self) -> Child:
        with self._lock:
            return self._idle.pop()

    def give_back(self, child: Child) -> None:
        """The thread that owned ``child`` is done: let it finish and exit."""
        child.stop()
        with self._lock:
            self._all.discard(child)

    def run(
        self, child: Child, delivery: Delivery, handler: Handler, time_limit_s: float | None
    ) -> tuple[Exception | None, float, Outcome]:
        """Run ``delivery`` in ``child``; a time limit or a dead child fails it by ``handler``'s policy."""
        grace_s = ASYNC_CANCEL_GRACE_S if handler.is_async else 0.0
        kill_after_s = None if time_limit_s is None else time_limit_s + grace_s
        started = time.perf_counter()
        try:
            return outcome_of(child.run(delivery, time_limit_s, kill_after_s))
        except (TimeLimitExceeded, WorkerLost) as exc:
            if isinstance(exc, WorkerLost):
                logger.warning("%s while running a message (transport id %s)", exc, delivery.transport_id)
            return exc, time.perf_counter() - started, decide(handler.retry_policy, exc, delivery.attempt)

    def renew(self, child: Child) -> Child:
        """``child``, or a new child in its place if it died or is worn out (too many tasks, too much memory)."""
        why = self._worn_out(child)
        if not why:
            return child
        logger.info("replacing child process %d: %s", child.pid, why)
        if child.lost:
            child.kill()  # reaps it and closes its pipes
        else:
            child.stop()
        with self._lock:
            self._all.discard(child)
        new = self._new()
        new.wait_ready()
        return new

    def _worn_out(self, child: Child) -> str:
        if child.lost:
            return "it died" if child.process.returncode != -signal.SIGKILL else "it was killed"
        if self.max_tasks is not None and child.tasks >= self.max_tasks:
            return f"it ran {child.tasks} messages (--max-tasks-per-child)"
        if self.max_memory_kb is not None and child.rss_kb > self.max_memory_kb:
            return f"its memory reached {child.rss_kb} KiB (--max-memory-per-child {self.max_memory_kb})"
        return ""

    def terminate_all(self) -> None:
        """Kill every child still running (at shutdown, once what they run was released)."""
        with self._lock:
            children = list(self._all)
        for child in children:
            child.terminate()

    def close(self) -> None:
        """Kill and reap every child (start-up failed)."""
        with self._lock:
            children, self._all = list(self._all), set()
        for child in children:
            child.kill()
