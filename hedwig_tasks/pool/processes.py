"""The worker's side of the process pool: start children, hand them deliveries, read the outcomes.

The pool has one *seat* per child process (``concurrency`` seats) and holds at most
:data:`LANES` tasks per seat: while a child runs one task, the next waits in its pipe, so a
child never idles while the worker settles the last message and takes the next. Handler
threads do the work before a run (decode, handler lookup, rate limit, idempotency claim,
signals) and :meth:`Pool.submit` the delivery: it waits for a seat with room, writes the frame to
its child and returns at once. One *dispatcher* thread waits on every child's reply pipe
(``poll``) and finishes tasks as replies come (several per wake-up when the worker is busy):
it frees the seat, then calls the task's ``done`` with the outcome, which settles the message
on that thread. Replies come back in the order the tasks were sent (see
:mod:`~hedwig_tasks.pool.framing` for the bytes between them). A thread per run blocking on
its own reply, and the wake-ups and hand-offs that takes, is what this saves.

Time limits are the dispatcher's too: its ``poll`` times out at the earliest deadline of a
task first in line in its child (a task's time limit starts when the one before it ends), and
it kills (SIGKILL) a child whose task passed it. Every end of a child is seen the same way, as
the end of its reply pipe. A task waiting in a child's pipe has not started: if the child
dies, is killed at a time limit or retires (``--max-memory-per-child``) before its turn, the
task goes to the child that replaces it as if just taken; only the task a child was running
fails (``WorkerLost`` or ``TimeLimitExceeded``, retried by policy). A replacement starts at
once, in the background; tasks for its seat wait for it to be ready (a child that retires
after ``--max-tasks-per-child`` answers what it has while its replacement starts). A child is
a fresh interpreter (``python -m hedwig_tasks.pool.child``), never a fork of the threaded
worker, so it inherits no lock another thread held; it builds its app from the worker's
``-A``/``--settings`` spec.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
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
    WorkerLost,
)
from hedwig_tasks.pool.framing import FrameReader, wait_readable, write_frame
from hedwig_tasks.retry import Outcome, decide
from hedwig_tasks.transports.base import Delivery

if TYPE_CHECKING:
    from hedwig_tasks._worker_options import WorkerOptions
    from hedwig_tasks.app import Hedwig
    from hedwig_tasks.handler import Handler

__all__ = ["LANES", "Child", "ChildSpec", "Done", "Pool", "child_spec", "outcome_of"]

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
#: Tasks a child holds at most: one running, the next waiting in its pipe.
LANES = 2

#: What a task's end is told: the error (or None), the run time in seconds, the outcome, and the
#: pid of the child that died or was killed running it (None otherwise). Called on a pool thread.
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


class _Task:
    """A delivery for a child: its frame, its limits, and who is told of its end."""

    __slots__ = ("attempt", "body", "done", "header", "kill_after_s", "policy", "seat", "started_at", "transport_id")

    def __init__(self, delivery: Delivery, handler: Handler, time_limit_s: float | None, done: Done) -> None:
        attributes = delivery.attributes
        self.header: dict[str, Any] = {
            "sub": delivery.subscription,
            "attempt": delivery.attempt,
            "id": delivery.transport_id,
            "attrs": attributes if isinstance(attributes, dict) else dict(attributes),
        }
        self.kill_after_s: float | None = None
        if time_limit_s is not None:
            self.header["limit"] = time_limit_s
            self.kill_after_s = time_limit_s + (ASYNC_CANCEL_GRACE_S if handler.is_async else 0.0)
        self.body = delivery.body
        self.policy = handler.retry_policy
        self.attempt = delivery.attempt
        self.transport_id = delivery.transport_id
        self.done = done
        self.seat: _Seat | None = None
        self.started_at = 0.0  #: when its child began it (the reply before it came), once first in line

    @property
    def deadline(self) -> float:
        return math.inf if self.kill_after_s is None else self.started_at + self.kill_after_s

    def fail(self, error: Exception, started: float, pid: int | None) -> None:
        """Tell ``done`` the task failed with ``error``, decided by its handler's retry policy."""
        outcome = decide(self.policy, error, self.attempt)
        self.done(error, max(0.0, time.monotonic() - started), outcome, pid)


class Child:
    """One child process, its pipes, and the tasks it was sent and has not answered, in order.

    The pool's lock guards its state; one writer at a time (its seat's) writes its input;
    only the dispatcher reads its replies.
    """

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.tasks = 0  #: tasks it has answered
        self.sent = 0  #: tasks it was sent
        self.rss_kb = 0  #: its peak resident memory, as it last reported, in KiB (with --max-memory-per-child)
        self.ready = False  #: it has built its app and said so
        self.accepting = True  #: it takes more tasks (False once worn out, dead or stopping)
        self.why = ""  #: why it stopped taking tasks
        self.killed: _Task | None = None  #: the task it was killed for passing its time limit
        self.seat: _Seat | None = None  #: the seat it was started for
        self.waiting: collections.deque[_Task] = collections.deque()  #: sent and not answered
        self.started = time.monotonic()
        self.task_w, task_r = -1, -1
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
            self.close_input()
            os.close(self.reply_r)
            raise
        finally:
            os.close(task_r)
            os.close(reply_w)
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
        if not self.ready:
            return self.started + DEFAULT_START_TIMEOUT_S
        return self.waiting[0].deadline if self.waiting else math.inf

    def write(self, task: _Task) -> None:
        """Write ``task``'s frame (blocking while the pipe is full); a gone child is ignored (its
        reply pipe's end tells the dispatcher)."""
        if self.task_w < 0:
            return
        try:
            write_frame(self.task_w, task.header, task.body)
        except OSError:
            pass

    def close_input(self) -> None:
        """Close its input (hold its seat's write lock): it exits once it has answered what it read."""
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
        """SIGKILL the child, from any thread: its reply pipe ends."""
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
    """A place for one child at a time (a retiring one may still answer beside its replacement)."""

    def __init__(self, child: Child) -> None:
        self.child: Child | None = child  #: None once it took no more and no replacement was started
        self.count = 0  #: its tasks not yet done, whichever child has them
        self.pending: collections.deque[_Task] = collections.deque()  #: for its next child, once ready
        self.write_lock = threading.Lock()  #: frames go whole and in the order of ``Child.waiting``


class Pool:
    """The children of a worker, :data:`LANES` tasks each at most; replaced as they wear out."""

    def __init__(self, spec: ChildSpec, options: WorkerOptions) -> None:
        self.spec = spec
        self.max_tasks = options.max_tasks_per_child
        self.closing = False  #: the worker is stopping: no child is started any more
        self._cond = threading.Condition(threading.Lock())
        self._all: set[Child] = set()  #: every child not yet reaped
        self._changed = True  #: a child came or went: the dispatcher polls a new set
        self._wake_at = math.inf  #: the dispatcher's next deadline
        self._stopped = False
        children = [self._new() for _ in range(options.concurrency)]
        try:
            for child in children:
                child.wait_ready()
        except BaseException:
            self.close()
            raise
        self._seats = [_Seat(child) for child in children]
        for seat in self._seats:
            assert seat.child is not None
            seat.child.seat = seat
        self.threads = LANES * len(children)  #: handler threads that keep it busy
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._dispatcher = threading.Thread(target=self._dispatch, name="hedwig-pool-dispatcher", daemon=True)
        self._dispatcher.start()
        logger.info("process pool: %d children ready (pids %s)", len(children), ", ".join(str(c.pid) for c in children))

    def _new(self) -> Child:
        child = Child(self.spec)
        self._all.add(child)
        self._changed = True
        return child

    # -- handler threads ----------------------------------------------------------------------

    def submit(self, delivery: Delivery, handler: Handler, time_limit_s: float | None, done: Done) -> None:
        """Send ``delivery`` to a child once a seat has room (blocking until then); ``done`` is
        told its end on the dispatcher's thread (a time limit or a dead child fails it by
        ``handler``'s retry policy; so does the worker stopping before a child took it)."""
        task = _Task(delivery, handler, time_limit_s, done)
        with self._cond:
            while not self.closing:
                seat = min(self._seats, key=_load)
                if seat.count < LANES:
                    seat.count += 1
                    break
                self._cond.wait()
            else:
                seat = None
        if seat is None:
            task.fail(WorkerLost("the worker is stopping"), time.monotonic(), None)
            return
        task.seat = seat
        self._send(seat, task)

    def run(
        self, delivery: Delivery, handler: Handler, time_limit_s: float | None
    ) -> tuple[Exception | None, float, Outcome, int | None]:
        """:meth:`submit` and wait for the end, on this thread."""
        ended = threading.Event()
        result: list[tuple[Exception | None, float, Outcome, int | None]] = []

        def done(error: Exception | None, duration_s: float, outcome: Outcome, pid: int | None) -> None:
            result.append((error, duration_s, outcome, pid))
            ended.set()

        self.submit(delivery, handler, time_limit_s, done)
        ended.wait()
        return result[0]

    def _send(self, seat: _Seat, task: _Task) -> None:
        with seat.write_lock:
            with self._cond:
                child = seat.child
                if child is None or not child.ready or seat.pending:  # its next child is not ready
                    seat.pending.append(task)
                    if child is None:
                        self._replace(seat)
                    return
                self._enqueue(seat, child, task)
                wake = bool(task.started_at) and task.deadline < self._wake_at
            if wake:
                self._wake()
            child.write(task)
            if not child.accepting:
                child.close_input()

    def _enqueue(self, seat: _Seat, child: Child, task: _Task) -> None:
        """``task`` is now ``child``'s; one that has had its tasks retires (hold the lock)."""
        child.waiting.append(task)
        child.sent += 1
        if len(child.waiting) == 1:
            task.started_at = time.monotonic()
        if self.max_tasks is not None and child.sent >= self.max_tasks:
            self._retire(seat, child, f"it ran {child.sent} messages (--max-tasks-per-child)")

    def _retire(self, seat: _Seat, child: Child, why: str) -> None:
        """``child`` takes no more tasks; another takes its seat (hold the lock)."""
        if child.accepting:
            child.accepting, child.why = False, why
        if seat.child is child:
            logger.info("replacing child process %d: %s", child.pid, why)
            seat.child = None
            self._replace(seat)

    def _replace(self, seat: _Seat) -> None:
        """Start a child for ``seat``; the dispatcher sends it the seat's pending tasks once it is
        ready (hold the lock)."""
        if self.closing:
            return
        try:
            seat.child = self._new()
            seat.child.seat = seat
        except OSError as exc:  # cannot fork: the seat's tasks fail, and the next one tries again
            logger.error("could not start a process-pool child: %s", exc)
            return
        self._wake()

    # -- the dispatcher -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        polled: dict[int, Child] = {}
        while True:
            with self._cond:
                if self._stopped:
                    return
                if self._changed:
                    self._changed = False
                    self._repoll(poller, polled)
                self._wake_at = min((child.deadline for child in polled.values()), default=math.inf)
            timeout_ms = None if self._wake_at == math.inf else max(0, (self._wake_at - time.monotonic()) * 1000)
            for fd, _ in poller.poll(None if timeout_ms is None else math.ceil(timeout_ms)):
                if fd == self._wake_r:
                    os.read(fd, 4096)
                elif (child := polled.get(fd)) is not None:
                    self._read(child)
            if self._wake_at <= time.monotonic():
                with self._cond:
                    self._expire(time.monotonic(), polled.values())

    def _repoll(self, poller: select.poll, polled: dict[int, Child]) -> None:
        """Poll the reply pipes of the children there are now (hold the lock)."""
        live = {child.reply_r: child for child in self._all if child.reply_r >= 0}
        for fd in polled.keys() - live.keys():
            poller.unregister(fd)
        for fd in live.keys() - polled.keys():
            poller.register(fd, select.POLLIN)
        polled.clear()
        polled.update(live)

    def _read(self, child: Child) -> None:
        frames = child.reader.read_some()
        if frames is None:
            self._ended(child)
            return
        for header, _ in frames:
            if child.ready:
                self._answered(child, header)
            else:
                self._started(child, header)

    def _answered(self, child: Child, reply: dict[str, Any]) -> None:
        """A reply came: free the seat first (the next task goes out), then finish the task."""
        with self._cond:
            task = child.waiting.popleft()
            child.tasks += 1
            child.rss_kb = int(reply.get("rss_kb", child.rss_kb))
            seat = task.seat
            assert seat is not None
            if reply.get("retire"):  # past --max-memory-per-child: it exits without reading more
                self._retire(seat, child, f"its memory reached {child.rss_kb} KiB (--max-memory-per-child)")
                self._hand_on(seat, child)
            elif child.waiting:
                child.waiting[0].started_at = time.monotonic()
            seat.count -= 1
            self._cond.notify()
        task.done(*outcome_of(reply), None)

    def _started(self, child: Child, frame: dict[str, Any]) -> None:
        """A replacement said it is ready (or why it is not): its seat's pending tasks go to it."""
        if "ready" not in frame:
            child.why = f"a process-pool child could not load the app: {frame.get('error')}"
            child.terminate()  # its pipe's end fails the seat's pending tasks
            return
        with self._cond:
            child.ready = True
            seat = child.seat
            flush = seat is not None and seat.child is child and bool(seat.pending)
        if flush:  # on a thread of its own: a frame past the pipe's buffer waits for the child
            threading.Thread(target=self._flush, args=(seat,), name="hedwig-pool-flush", daemon=True).start()

    def _flush(self, seat: _Seat) -> None:
        """Send ``seat``'s pending tasks to its child, in order."""
        with seat.write_lock:
            with self._cond:
                child, sent = seat.child, []
                while child is not None and child.ready and child.accepting and seat.pending:
                    task = seat.pending.popleft()
                    self._enqueue(seat, child, task)
                    sent.append(task)
                self._wake()  # a first task's time limit runs
            if child is not None:
                for task in sent:
                    child.write(task)
                if not child.accepting:
                    child.close_input()

    def _expire(self, now: float, children: Any) -> None:
        """Kill each child past its start-up's or its running task's deadline (hold the lock)."""
        for child in list(children):
            if child.deadline <= now and child.killed is None:
                if child.ready:
                    child.killed = child.waiting[0]
                else:
                    why = f"no answer in {DEFAULT_START_TIMEOUT_S:g}s"
                    child.why = f"a process-pool child could not load the app: {why}"
                child.terminate()

    def _ended(self, child: Child) -> None:
        """A child's reply pipe ended (it exited, died or was killed): the task it ran fails, the
        ones waiting behind it go to its replacement (started now, unless it never started itself)."""
        code = child.process.wait()
        now = time.monotonic()
        seat = child.seat
        assert seat is not None
        with self._cond:
            self._all.discard(child)
            self._changed = True
            os.close(child.reply_r)
            child.reply_r = -1
            running = child.waiting.popleft() if child.ready and child.waiting else None
            failed: list[_Task] = []
            if not child.ready:  # no replacement: the next task tries again
                why = child.why or f"a process-pool child could not load the app: exit code {code}"
                child.accepting = False
                if seat.child is child:
                    seat.child, failed = None, list(seat.pending)
            else:
                why = "the worker is stopping"
                self._retire(seat, child, "it died")
                self._hand_on(seat, child)
                if self.closing:
                    failed = list(seat.pending)
            if failed:
                seat.pending.clear()
            seat.count -= len(failed) + (running is not None)
            self._cond.notify_all()
        self._close_input(seat, child)
        if running is not None:
            self._lost(child, running, code, now)
        for task in failed:
            task.fail(WorkerLost(why), now, None)

    def _lost(self, child: Child, task: _Task, code: int, started: float) -> None:
        if child.killed is task and task.kill_after_s is not None:
            error: Exception = TimeLimitExceeded(float(task.header.get("limit", task.kill_after_s)))
        else:
            cause = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            error = WorkerLost(f"child process {child.pid} died ({cause})")
            logger.warning("%s while running a message (transport id %s)", error, task.transport_id)
        task.fail(error, task.started_at or started, child.pid)

    def _hand_on(self, seat: _Seat, child: Child) -> None:
        """What waits in ``child``'s pipe never started: its seat's next child takes it first (hold the lock)."""
        if child.waiting:
            seat.pending.extendleft(reversed(child.waiting))
            child.waiting.clear()

    def _close_input(self, seat: _Seat, child: Child) -> None:
        """Close a gone child's input once no writer of its seat is busy (on a thread of its own if
        one is: a write may wait on a busy child)."""
        if seat.write_lock.acquire(blocking=False):
            try:
                child.close_input()
            finally:
                seat.write_lock.release()
        else:
            threading.Thread(target=_close_input, args=(seat, child), name="hedwig-pool-close", daemon=True).start()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:  # it has been woken already
            pass

    # -- shutdown -----------------------------------------------------------------------------

    def wait_idle(self, deadline: float, abort: threading.Event) -> bool:
        """Wait until no task is in a child or waiting for one (False if ``deadline`` came first)."""
        with self._cond:
            while any(seat.count for seat in self._seats):
                left = deadline - time.monotonic()
                if left <= 0 or abort.is_set():
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the pool: children with nothing to do finish and exit, those still running what the
        worker released are killed; the dispatcher fails what they had."""
        with self._cond:
            self.closing = True
            children = list(self._all)
            self._cond.notify_all()
        for child in children:
            if child.waiting or not child.ready:
                child.terminate()
        for child in children:
            if child.seat is not None:
                _close_input(child.seat, child)
        deadline = time.monotonic() + timeout_s
        for child in children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.terminate()
                child.process.wait()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._all and time.monotonic() < deadline:  # the dispatcher reads their pipes' ends
                self._cond.wait(0.1)
            self._stopped = True
        self._wake()
        self._dispatcher.join(timeout_s)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close(self) -> None:
        """Kill and reap every child (start-up failed)."""
        self.closing = True
        children, self._all = list(self._all), set()
        for child in children:
            child.kill()


def _load(seat: _Seat) -> int:
    return seat.count


def _close_input(seat: _Seat, child: Child) -> None:
    with seat.write_lock:
        child.close_input()
