"""The worker's side of the process pool: start children, hand them deliveries, read the outcomes.

Each child is fed by two of the worker's handler threads (two *lanes*): while it runs one
task, the next waits in its pipe, so a child never idles while the worker settles the last
message and takes the next, and a busy worker wakes less per message. Replies come back in
order; each lane reads its own once the ones before it are read. The threads still do
everything else a handler thread does: leases, signals, settling; a child only decodes and
runs the handler (see :mod:`~hedwig_tasks.pool.framing` for the bytes between them).

A task waiting in a child's pipe has not started: if the child dies, is killed at a time
limit or retires (``--max-memory-per-child``) before its turn, the task goes to the next child
as if just taken; only the task a child was running fails (``WorkerLost`` or
``TimeLimitExceeded``, retried by policy). A waiting task's time limit starts when the one
before it ends. A child is a fresh interpreter (``python -m hedwig_tasks.pool.child``), never a
fork of the threaded worker, so it inherits no lock another thread held; it builds its app
from the worker's ``-A``/``--settings`` spec.
"""

from __future__ import annotations

import collections
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
from hedwig_tasks.pool.framing import FrameReader, wait_readable, write_frame
from hedwig_tasks.retry import Outcome, decide
from hedwig_tasks.transports.base import Delivery

if TYPE_CHECKING:
    from hedwig_tasks._worker_options import WorkerOptions
    from hedwig_tasks.app import Hedwig
    from hedwig_tasks.handler import Handler

__all__ = ["LANES", "Child", "ChildSpec", "Lane", "Pool", "child_spec"]

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
#: Handler threads that feed each child: one task running, the next waiting in its pipe.
LANES = 2


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


class _Ticket:
    """A task sent to a child and not yet answered."""

    __slots__ = ("started_at",)

    def __init__(self) -> None:
        self.started_at = 0.0  #: when the child began it (the reply before it came), once it is first in line


class Child:
    """One child process, its pipes, and the tasks it was sent, in order. Thread-safe."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.tasks = 0  #: tasks it has answered
        self.sent = 0  #: tasks it was sent
        self.rss_kb = 0  #: its peak resident memory, as it last reported, in KiB
        self.accepting = True  #: it takes more tasks (False once worn out, dead or stopping)
        self.answering = True  #: it will answer what waits for it (False once dead or retired)
        self.why = ""  #: why it stopped taking tasks
        self.lost = False  #: it died or was killed during a task
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()  #: a frame is written whole, and the pipe closed between frames
        self._closed = False
        task_r, self._task_w = os.pipe()
        self._reply_r, reply_w = os.pipe()
        self._reader = FrameReader(self._reply_r)
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
        frame = self._reader.read() if wait_readable(self._reply_r, timeout_s) else None
        if frame is None or "ready" not in frame[0]:
            self.kill()
            why = frame[0].get("error") if frame else f"no answer in {timeout_s:g}s (exit code {self.process.poll()})"
            raise ConfigurationError(f"a process-pool child could not load the app: {why}")

    def send(self, header: dict[str, Any], body: bytes) -> _Ticket | None:
        """Send a task (one sender at a time); None if the child is gone (it takes no more)."""
        ticket = _Ticket()
        with self._cond:
            self._waiting.append(ticket)
            if len(self._waiting) == 1:
                ticket.started_at = time.monotonic()
        try:
            with self._write_lock:
                if self._task_w < 0:
                    raise BrokenPipeError("its input is closed")
                write_frame(self._task_w, header, body)
        except OSError:
            with self._cond:
                self._waiting.remove(ticket)
                self._cond.notify_all()
            self.retire("it died")
            return None
        self.sent += 1
        return ticket

    def retire(self, why: str) -> None:
        """Send it no more tasks; it exits once it has answered those it has."""
        if self.accepting:
            self.accepting, self.why = False, why
            self._close_pipes(reply=False)

    def await_reply(
        self, ticket: _Ticket, time_limit_s: float | None, kill_after_s: float | None
    ) -> dict[str, Any] | None:
        """The reply to ``ticket``, once the replies before it are read; None if the task never
        started (the child died, was killed or retired first).

        ``kill_after_s`` after the task started with no reply, the child is killed and
        :class:`TimeLimitExceeded` raised; :class:`WorkerLost` if it dies while running the task.
        """
        with self._cond:
            while self.answering and self._waiting[0] is not ticket:
                self._cond.wait()
            if not self.answering:
                self._waiting.remove(ticket)
                return None
            started_at = ticket.started_at
        # first in line: no other thread reads this child's replies until this one is done
        if kill_after_s is not None and not self._reader.buffered():
            if not wait_readable(self._reply_r, started_at + kill_after_s - time.monotonic()):
                self.terminate()
                self.process.wait()
                self._end("it was killed")
                raise TimeLimitExceeded(time_limit_s or kill_after_s or 0.0)
        frame = self._reader.read()
        if frame is None:
            code = self.process.wait()
            cause = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            self._end("it died" if code != -signal.SIGKILL else "it was killed")
            raise WorkerLost(f"child process {self.pid} died ({cause})")
        reply = frame[0]
        with self._cond:
            self._waiting.popleft()
            self.tasks += 1
            self.rss_kb = int(reply.get("rss_kb", 0))
            if reply.get("retire"):  # past --max-memory-per-child: it exits without reading more
                self.answering = self.accepting = False
                self.why = f"its memory reached {self.rss_kb} KiB (--max-memory-per-child)"
            elif self._waiting:
                self._waiting[0].started_at = time.monotonic()
            self._cond.notify_all()
        return reply

    def _end(self, why: str) -> None:
        """It died or was killed while running the first task in line (which is dropped)."""
        with self._cond:
            self._waiting.popleft()
            self.answering, self.lost = False, True
            self._cond.notify_all()
        self.retire(why)
        self.why = why

    def claim_close(self) -> bool:
        """True once, for the caller who should close it: it takes and answers no more."""
        with self._cond:
            if self._closed or self._waiting or (self.accepting and self.answering):
                return False
            self._closed = True
            return True

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
        """Kill the child at once (SIGKILL), reap it and close its pipes."""
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
        with self._write_lock:
            if self._task_w >= 0:
                os.close(self._task_w)
                self._task_w = -1
        with self._cond:
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


class _Seat:
    """A place for one child at a time, and the lanes that feed it."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.lock = threading.Lock()  #: held to send (frames go whole and in order) or replace the child
        self.lanes = 0  #: lanes taken by handler threads and not given back


class Lane:
    """A handler thread's way to a child, shared with another lane. What its last run met:
    ``lost`` (the child died or was killed) and ``pid`` (of that child)."""

    def __init__(self, seat: _Seat) -> None:
        self.seat = seat
        self.lost = False
        self.pid = seat.child.pid

    def __repr__(self) -> str:
        return f"<Lane to {self.seat.child!r}>"


class Pool:
    """The children of a worker, each fed by :data:`LANES` handler threads; replaced as they wear out."""

    def __init__(self, spec: ChildSpec, options: WorkerOptions) -> None:
        self.spec = spec
        self.max_tasks = options.max_tasks_per_child
        self.closing = False  #: the worker is stopping: no child is started any more
        self._lock = threading.Lock()
        self._all: set[Child] = set()
        children = [self._new() for _ in range(options.concurrency)]
        try:
            for child in children:
                child.wait_ready()
        except BaseException:
            self.close()
            raise
        seats = [_Seat(child) for child in children]
        # popped from the end: the first handler thread of each child first, then the second
        self._idle = [Lane(seat) for _ in range(LANES) for seat in seats]
        self.threads = len(self._idle)  #: handler threads the pool can feed: LANES per child
        logger.info("process pool: %d children ready (pids %s)", len(children), ", ".join(str(c.pid) for c in children))

    def _new(self) -> Child:
        child = Child(self.spec)
        with self._lock:
            self._all.add(child)
        return child

    def take(self) -> Lane:
        with self._lock:
            lane = self._idle.pop()
        with lane.seat.lock:
            lane.seat.lanes += 1
        return lane

    def give_back(self, lane: Lane) -> None:
        """The thread that owned ``lane`` is done: the last of a child's lanes lets it finish and exit."""
        seat = lane.seat
        with seat.lock:
            seat.lanes -= 1
            if seat.lanes:
                return
            child = seat.child
            child.retire("the worker is stopping")
        self._close(child, force=False)

    def run(
        self, lane: Lane, delivery: Delivery, handler: Handler, time_limit_s: float | None
    ) -> tuple[Exception | None, float, Outcome]:
        """Run ``delivery`` in ``lane``'s child; a time limit or a dead child fails it by ``handler``'s policy."""
        header = {
            "sub": delivery.subscription,
            "attempt": delivery.attempt,
            "id": delivery.transport_id,
            "attrs": delivery.attributes if isinstance(delivery.attributes, dict) else dict(delivery.attributes),
        }
        if time_limit_s is not None:
            header["limit"] = time_limit_s
        grace_s = ASYNC_CANCEL_GRACE_S if handler.is_async else 0.0
        kill_after_s = None if time_limit_s is None else time_limit_s + grace_s
        lane.lost = False
        started = time.perf_counter()
        try:
            return outcome_of(self._run(lane, header, delivery.body, time_limit_s, kill_after_s))
        except (TimeLimitExceeded, WorkerLost, ConfigurationError) as exc:
            error = exc if not isinstance(exc, ConfigurationError) else WorkerLost(str(exc))
            if not isinstance(error, TimeLimitExceeded):
                logger.warning("%s while running a message (transport id %s)", error, delivery.transport_id)
            return error, time.perf_counter() - started, decide(handler.retry_policy, error, delivery.attempt)

    def _run(
        self, lane: Lane, header: dict[str, Any], body: bytes, time_limit_s: float | None, kill_after_s: float | None
    ) -> dict[str, Any]:
        """Send until a child runs the task (one that dies before its turn never started it)."""
        while True:
            child, ticket = self._send(lane.seat, header, body)
            lane.pid = child.pid
            try:
                reply = child.await_reply(ticket, time_limit_s, kill_after_s)
            except (TimeLimitExceeded, WorkerLost):
                lane.lost = True
                raise
            finally:
                self._close(child, force=child.lost)
            if reply is not None:
                return reply
            if self.closing:
                raise WorkerLost(f"child process {child.pid} stopped before running the message")

    def _send(self, seat: _Seat, header: dict[str, Any], body: bytes) -> tuple[Child, _Ticket]:
        with seat.lock:
            while True:
                child = self._current(seat)
                ticket = child.send(header, body)
                if ticket is None:
                    continue
                if self.max_tasks is not None and child.sent >= self.max_tasks:
                    child.retire(f"it ran {child.sent} messages (--max-tasks-per-child)")
                return child, ticket

    def _current(self, seat: _Seat) -> Child:
        """The seat's child, or a new one in its place if it takes no more tasks (hold ``seat.lock``)."""
        old = seat.child
        if old.accepting:
            return old
        if self.closing:
            raise WorkerLost("the worker is stopping")
        logger.info("replacing child process %d: %s", old.pid, old.why)
        new = self._new()
        try:
            new.wait_ready()
        except ConfigurationError:
            with self._lock:
                self._all.discard(new)
            raise
        seat.child = new
        return new

    def renew(self, lane: Lane) -> Lane:
        """After a run: a child that takes no more tasks is replaced now, not when the next task comes."""
        seat = lane.seat
        if not seat.child.accepting and not self.closing:
            with seat.lock:
                self._current(seat)
        return lane

    def _close(self, child: Child, *, force: bool) -> None:
        """Reap ``child`` once it takes and answers no more (killed if ``force``)."""
        if not child.claim_close():
            return
        if force:
            child.kill()
        else:
            child.stop()
        with self._lock:
            self._all.discard(child)

    def terminate_all(self) -> None:
        """Kill every child still running (at shutdown, once what they run was released)."""
        self.closing = True
        with self._lock:
            children = list(self._all)
        for child in children:
            child.terminate()

    def close(self) -> None:
        """Kill and reap every child (start-up failed)."""
        self.closing = True
        with self._lock:
            children, self._all = list(self._all), set()
        for child in children:
            child.kill()
