"""The worker's side of the process pool: start children, hand them deliveries, read the outcomes.

One *dispatcher* thread does all the talking to the children. It waits (``poll``) on every
child's reply pipe, on input pipes that are full and on a wake-up pipe, and in each round: reads
the replies that came (several per wake-up when the worker is busy), frees their seats, fills
every seat's room with the next tasks and writes them (one write per child per round), then
finishes the answered tasks; and it kills a child whose task passed its time limit (the poll's
timeout is the earliest such deadline). The pool has one *seat* per child process, which holds
:data:`LANES` tasks (one running, the next waiting in its pipe, so a child never idles while the
worker settles the last message and takes the next), or, while the child's runs are quick, as
many as run in :data:`BACKLOG_S` (:func:`lanes_for`, at most :data:`MOST_LANES`). Seats of quick
children are filled busiest first: a child that is running something takes more without being
woken (each wake-up of a sleeping process costs about what a quick run does), and another child
is woken only for what the first has no room for. The others are filled emptiest first, so a
long run never keeps a task waiting while another child idles. No thread waits on a child: each
wake-up of a thread and each GIL hand-off cost about what a message's own work does, and a
thread per run blocking on its own reply cost several per message (``bench/pool.py``).
:mod:`~hedwig_tasks.pool.children` has a child's pipes and tasks, and
:mod:`~hedwig_tasks.pool.framing` the bytes between worker and children.

Where the tasks come from: the worker's ``feed`` (called on the dispatcher when a seat has
room) takes a delivery, does the work before a run on that thread and :meth:`Pool.submit`\\ s
it, or hands it to a thread of its own when the work may wait (a rate limit, an idempotency
claim, a tracing span); :meth:`Pool.submit` from such a thread wakes the dispatcher. A task's
``done`` is called on the dispatcher with the outcome, once the next task has gone out.

A task waiting in a child's pipe has not started: if the child dies, is killed at a time limit
or retires (``--max-memory-per-child``) before its turn, the task goes to the child that
replaces it as if just taken; only the task a child was running fails (``WorkerLost`` or
``TimeLimitExceeded``, retried by policy). A waiting task's time limit starts when the one
before it ends. A replacement starts at once, in the background (a child that retires after
``--max-tasks-per-child`` answers what it has meanwhile); tasks for its seat wait for it to be
ready. A child is a fresh interpreter (``python -m hedwig_tasks.pool.child``), never a fork of
the threaded worker, so it inherits no lock another thread held; it builds its app from the
worker's ``-A``/``--settings`` spec.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hedwig_tasks.exceptions import TimeLimitExceeded, WorkerLost
from hedwig_tasks.pool.children import (
    DEFAULT_START_TIMEOUT_S,
    Child,
    ChildSpec,
    Done,
    Task,
    child_spec,
    outcome_of,
)
from hedwig_tasks.retry import Outcome
from hedwig_tasks.transports.base import Delivery

if TYPE_CHECKING:
    from hedwig_tasks._worker_options import WorkerOptions
    from hedwig_tasks.handler import Handler

__all__ = ["LANES", "MOST_LANES", "Child", "ChildSpec", "Done", "Pool", "child_spec", "lanes_for", "outcome_of"]

logger = logging.getLogger(__name__)

#: How long a child that was told to stop may take to exit before it is killed, in seconds.
STOP_TIMEOUT_S = 5.0
#: Tasks a child holds at most while its runs are long: one running, the next waiting in its pipe.
LANES = 2
#: Tasks a child holds at most, however quick its runs.
MOST_LANES = 16
#: How long the tasks waiting in a child's pipe may take to run, in all (seconds, at the
#: child's average): a child with quick runs takes more, so it reads and the worker writes
#: several at a time, and another child is woken only for what this one has no room for.
BACKLOG_S = 0.002
#: What a task costs a child besides its handler's run (decoding it, replying), in seconds.
TASK_COST_S = 0.00005
#: A quick child whose running task has taken this long (seconds) is given no more until it
#: answers, so a run that stalls (a slow call in a handler that is usually quick) holds up
#: only what already waits in its pipe, never what comes after.
STALL_S = 0.02


def lanes_for(run_s: float) -> int:
    """How many tasks a child whose runs take ``run_s`` on average holds (:data:`BACKLOG_S`)."""
    return max(LANES, min(MOST_LANES, int(BACKLOG_S / (run_s + TASK_COST_S))))


class _Seat:
    """A place for one child at a time (a retiring one may still answer beside its replacement)."""

    __slots__ = ("child", "count", "lanes", "pending", "run_s")

    def __init__(self) -> None:
        self.child: Child | None = None  #: None while no child takes its tasks and none is starting
        self.count = 0  #: its tasks not yet done, whichever child has them
        self.lanes = LANES  #: how many it takes (lanes_for its runs' average)
        self.run_s = BACKLOG_S  #: its runs' average length, recent ones weighing more (seconds)
        self.pending: collections.deque[Task] = collections.deque()  #: for its next child, once ready


class Pool:
    """The children of a worker, :data:`LANES` tasks each at most, talked to by one dispatcher
    thread; replaced as they wear out. ``feed`` (called on the dispatcher while a seat has room)
    takes the next delivery and submits it, or returns False if there is none."""

    def __init__(self, spec: ChildSpec, options: WorkerOptions, feed: Callable[[], bool] | None = None) -> None:
        self.spec = spec
        self.max_tasks = options.max_tasks_per_child
        self.closing = False  #: the worker is stopping: no child is started any more
        self._feed = feed or (lambda: False)
        self._seats = [_Seat() for _ in range(options.concurrency)]
        self._all: frozenset[Child] = frozenset()  #: every child not yet reaped (replaced whole: others read it)
        self._ready: collections.deque[Task] = collections.deque()  #: submitted from other threads
        self._stop_by = math.inf  #: when children still running at a stop are killed
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
        self._fds: dict[int, Child] = {}  #: reply pipes (and input pipes that are full) polled
        self._unsent: list[Child] = []  #: children with frames queued this round, to write at its end
        self._thread: threading.Thread | None = None
        try:
            for seat in self._seats:
                seat.child = self._start(seat)
            for seat in self._seats:
                assert seat.child is not None
                seat.child.wait_ready()
                os.set_blocking(seat.child.reply_r, False)
        except BaseException:
            self.close()
            raise
        self.threads = LANES * len(self._seats)  #: threads for runs whose start may wait
        self._thread = threading.Thread(target=self._dispatch, name="hedwig-pool-dispatcher", daemon=True)
        self._thread.start()
        pids = ", ".join(str(child.pid) for child in self._all)
        logger.info("process pool: %d children ready (pids %s)", len(self._seats), pids)

    # -- any thread ---------------------------------------------------------------------------

    def submit(self, delivery: Delivery, handler: Handler, time_limit_s: float | None, done: Done) -> None:
        """Run ``delivery`` in a child once a seat has room; ``done`` is told its end on the
        dispatcher (a time limit or a dead child fails it by ``handler``'s retry policy; so does
        the worker stopping before a child took it). Returns at once."""
        self._ready.append(Task(delivery, handler, time_limit_s, done))
        if threading.current_thread() is not self._thread:
            self._wake()
            if self._thread is not None and not self._thread.is_alive():  # stopped meanwhile
                self._fail_submitted()

    def run(
        self, delivery: Delivery, handler: Handler, time_limit_s: float | None
    ) -> tuple[Exception | None, float, Outcome, int | None]:
        """:meth:`submit` and wait for the end, on this thread (never the dispatcher)."""
        ended = threading.Event()
        result: list[tuple[Exception | None, float, Outcome, int | None]] = []

        def done(error: Exception | None, duration_s: float, outcome: Outcome, pid: int | None) -> None:
            result.append((error, duration_s, outcome, pid))
            ended.set()

        self.submit(delivery, handler, time_limit_s, done)
        ended.wait()
        return result[0]

    def on_dispatcher(self) -> bool:
        """Whether this is the dispatcher's thread."""
        return threading.current_thread() is self._thread

    def wake(self) -> None:
        """Have the dispatcher look for work (the worker received some)."""
        self._wake()

    def waiting(self) -> int:
        """Tasks that wait for a child to take them: behind a running one, or not yet sent (a
        count read without a lock, close enough for the receive loop's batching)."""
        return len(self._ready) + sum(max(0, seat.count - 1) for seat in self._seats)

    def busy(self) -> bool:
        """Whether a task is in a child or waits for one."""
        return bool(self._ready) or any(seat.count for seat in self._seats)

    def wait_idle(self, deadline: float, abort: threading.Event) -> bool:
        """Wait until no task is in a child or waits for one (False if ``deadline`` or ``abort`` came first)."""
        while self.busy():
            if time.monotonic() >= deadline or abort.wait(min(0.05, deadline - time.monotonic())):
                return False
        return True

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the pool: children with nothing to do finish and exit, those still running what the
        worker released are killed (after ``timeout_s`` any left are); what they had fails."""
        self._stop_by = time.monotonic() + timeout_s
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s + STOP_TIMEOUT_S)
            if self._thread.is_alive():  # it still polls the wake-up pipe: closing it would spin it
                logger.error("process pool dispatcher did not end in %.1fs; leaving it", timeout_s + STOP_TIMEOUT_S)
                return
        self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
        os.close(wake_r)
        os.close(wake_w)

    def close(self) -> None:
        """Kill and reap every child at once (start-up failed)."""
        if self._thread is not None:
            self.stop(0.0)
            return
        self.closing = True
        children, self._all = self._all, frozenset()
        for child in children:
            child.kill()
        self._close_wake_pipe()

    def _wake(self) -> None:
        if self._wake_w < 0:  # stopped: a late submit (an abandoned thread's) has nobody to wake
            return
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:  # it has been woken already
            pass

    # -- the dispatcher -----------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._all or not self.closing:
            try:
                if self._stop_by != math.inf and not self.closing:
                    self._close_children()
                self._fill()
                self._poll()
            except Exception:  # a bug here must not stop the pool: the worker would hang
                logger.exception("process pool dispatcher: unexpected error")
        self._fail_submitted()

    def _fail_submitted(self) -> None:
        while True:
            try:
                task = self._ready.popleft()
            except IndexError:
                return
            task.fail(WorkerLost("the worker is stopping"))

    def _poll(self) -> None:
        deadline = min(self._stop_by, min((child.deadline for child in self._all), default=math.inf))
        timeout_ms = None if deadline == math.inf else max(0, math.ceil((deadline - time.monotonic()) * 1000))
        answered: list[tuple[Task, dict[str, Any]]] = []
        for fd, _ in self._poller.poll(timeout_ms):
            if fd == self._wake_r:
                os.read(fd, 4096)
            elif (child := self._fds.get(fd)) is None:
                continue
            elif fd == child.reply_r:
                self._read(child, answered)
            elif child.flush():  # its input had room again
                self._unpoll(fd)
        if answered:
            try:
                self._fill()  # the next tasks go out first, then the answered ones are settled
            finally:
                self._settle_answered(answered)
        now = time.monotonic()
        if deadline <= now:
            self._expire(now)

    def _settle_answered(self, answered: list[tuple[Task, dict[str, Any]]]) -> None:
        """Settle each answered task, whatever another one's settling raised."""
        for task, reply in answered:
            try:
                task.done(*outcome_of(reply), None)
            except Exception:
                logger.exception("process pool: settling message %s failed", task.transport_id)

    def _fill(self) -> None:
        """Give every seat with room its next tasks: submitted ones first, then what ``feed`` brings."""
        order = functools.partial(_order, now=time.monotonic())
        while True:
            seat = min(self._seats, key=order)
            if order(seat) == _NO_ROOM or self.closing:
                break
            if self._ready:
                self._send(seat, self._ready.popleft())
            elif not self._feed():
                break
        self._write_out()

    def _write_out(self) -> None:
        """Write what this round queued for each child, in one write each where its pipe has room."""
        for child in self._unsent:
            if len(child.outbox) > 1:
                joined = memoryview(b"".join(child.outbox))
                child.outbox.clear()
                child.outbox.append(joined)
            if not child.flush():
                self._poller.register(child.task_w, select.POLLOUT)
                self._fds[child.task_w] = child
        self._unsent.clear()

    def _send(self, seat: _Seat, task: Task) -> None:
        seat.count += 1
        task.seat = seat
        child = seat.child
        if child is None:
            child = self._replace(seat)
        if child is None:
            self._fail([task], WorkerLost("no process-pool child could be started"))
        elif not child.ready or seat.pending:  # its next child is not ready
            seat.pending.append(task)
        else:
            self._enqueue(seat, child, task)

    def _enqueue(self, seat: _Seat, child: Child, task: Task) -> None:
        """Send ``task`` to ``child``; one that has had its tasks retires."""
        child.waiting.append(task)
        child.sent += 1
        if len(child.waiting) == 1:
            task.started_at = time.monotonic()
        if not child.outbox:  # else it is already written as its pipe has room
            self._unsent.append(child)
        child.outbox.append(memoryview(task.frame))
        if self.max_tasks is not None and child.sent >= self.max_tasks:
            self._retire(seat, child, f"it ran {child.sent} messages (--max-tasks-per-child)")

    def _read(self, child: Child, answered: list[tuple[Task, dict[str, Any]]]) -> None:
        frames = child.reader.read_some()
        if frames is None:
            self._ended(child)
            return
        for header, _ in frames:
            if child.ready:
                answered.append((self._answered(child, header), header))
            else:
                self._started(child, header)

    def _answered(self, child: Child, reply: dict[str, Any]) -> Task:
        """A reply came: free the seat; the task is finished once the next ones went out."""
        task = child.waiting.popleft()
        child.tasks += 1
        if "rss_kb" in reply:
            child.rss_kb = int(reply["rss_kb"])
        seat = task.seat
        assert seat is not None
        if reply.get("retire"):  # past --max-memory-per-child: it exits without reading more
            self._retire(seat, child, f"its memory reached {child.rss_kb} KiB (--max-memory-per-child)")
            self._hand_on(seat, child)
        elif child.waiting:
            child.waiting[0].started_at = time.monotonic()
        seat.count -= 1
        seat.run_s += (float(reply.get("duration_s", 0.0)) - seat.run_s) / 4
        seat.lanes = lanes_for(seat.run_s)
        return task

    def _started(self, child: Child, frame: dict[str, Any]) -> None:
        """A replacement said it is ready (or why it is not): its seat's pending tasks go to it."""
        if "ready" not in frame:
            child.why = f"a process-pool child could not load the app: {frame.get('error')}"
            child.dying = True
            child.terminate()  # its pipe's end fails the seat's pending tasks
            return
        child.ready = True
        seat = child.seat
        assert seat is not None
        while seat.child is child and seat.pending:  # it may retire after a few (--max-tasks-per-child)
            self._enqueue(seat, child, seat.pending.popleft())

    def _retire(self, seat: _Seat, child: Child, why: str, *, level: int = logging.INFO) -> None:
        """``child`` takes no more tasks (its input closes once written); another takes its seat."""
        if child.accepting:
            child.accepting, child.why = False, why
            if not child.outbox:
                child.close_input()
        if seat.child is child:
            if not self.closing:
                logger.log(level, "replacing child process %d: %s", child.pid, why)
            seat.child = None
            self._replace(seat)

    def _replace(self, seat: _Seat) -> Child | None:
        """Start a child for ``seat``; it gets the seat's pending tasks once it is ready."""
        if self.closing:
            return None
        try:
            seat.child = self._start(seat)
            os.set_blocking(seat.child.reply_r, False)  # a stale poll event of a reused fd must not block
        except OSError as exc:  # cannot fork now: the seat's next task tries again
            logger.error("could not start a process-pool child: %s", exc)
        return seat.child

    def _start(self, seat: _Seat) -> Child:
        child = Child(self.spec, seat)
        self._all = self._all | {child}
        self._poller.register(child.reply_r, select.POLLIN)
        self._fds[child.reply_r] = child
        return child

    def _expire(self, now: float) -> None:
        """Kill each child past its start-up's or its running task's deadline, or the stop's."""
        for child in self._all:
            if child.deadline <= now:
                if child.ready:
                    child.killed = child.waiting[0]
                else:
                    child.why = (
                        f"a process-pool child could not load the app: no answer in {DEFAULT_START_TIMEOUT_S:g}s"
                    )
                child.dying = True
                child.terminate()
            elif self._stop_by <= now:
                child.dying = True
                child.terminate()

    def _ended(self, child: Child) -> None:
        """A child's reply pipe ended (it exited, died or was killed): the task it ran fails, the
        ones waiting behind it go to its replacement (started now, unless it never started itself)."""
        code = child.process.wait()
        self._unpoll(child.reply_r)
        self._unpoll(child.task_w)
        os.close(child.reply_r)
        child.reply_r = -1
        child.close_input()
        self._all = self._all - {child}
        seat = child.seat
        assert seat is not None
        running = child.waiting.popleft() if child.ready and child.waiting else None
        if not child.ready:  # no replacement: the seat's next task tries again
            child.accepting = False
            why = child.why or f"a process-pool child could not load the app: exit code {code}"
            if not self.closing:
                logger.error("%s (its seat's next message starts another)", why)
            if seat.child is child:
                seat.child = None
                self._fail(list(seat.pending), WorkerLost(why))
                seat.pending.clear()
        else:
            if child.dying:
                self._retire(seat, child, "it was killed")
            else:  # nobody here stopped it: say how it ended
                self._retire(seat, child, f"it died ({_exit_cause(code)})", level=logging.WARNING)
            self._hand_on(seat, child)
            if seat.child is None:  # stopping, or no child could be started
                why = "the worker is stopping" if self.closing else "no child process could be started in its place"
                self._fail(list(seat.pending), WorkerLost(why))
                seat.pending.clear()
        if running is not None:
            seat.count -= 1
            self._lost(child, running, code)

    def _lost(self, child: Child, task: Task, code: int) -> None:
        if child.killed is task and task.kill_after_s is not None:
            error: Exception = TimeLimitExceeded(task.time_limit_s or task.kill_after_s)
        else:
            error = WorkerLost(f"child process {child.pid} died ({_exit_cause(code)})")
            logger.warning("%s while running a message (transport id %s)", error, task.transport_id)
        task.fail(error, child.pid)

    def _hand_on(self, seat: _Seat, child: Child) -> None:
        """What waits in ``child``'s pipe never started: its seat's next child takes it first."""
        if child.waiting:
            seat.pending.extendleft(reversed(child.waiting))
            child.waiting.clear()
            child.outbox.clear()

    def _fail(self, tasks: list[Task], error: Exception) -> None:
        for task in tasks:
            assert task.seat is not None
            task.seat.count -= 1
            task.fail(error)

    def _close_children(self) -> None:
        """The worker stops: idle children finish and exit, those still running something are killed."""
        self.closing = True
        for seat in self._seats:
            self._fail(list(seat.pending), WorkerLost("the worker is stopping"))
            seat.pending.clear()
        for child in self._all:
            child.accepting = False
            if child.waiting or not child.ready:
                child.terminate()
            elif not child.outbox:
                child.close_input()

    def _unpoll(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            self._poller.unregister(fd)


#: What :func:`_order` gives a seat that takes nothing now.
_NO_ROOM = (2, 0)


def _order(seat: _Seat, now: float) -> tuple[int, int]:
    """Which seat takes the next task first (the lowest): a quick child that is running
    something, the fullest such; else the one with the most room (see the module's doc). A
    quick child whose run has taken over :data:`STALL_S` takes nothing until it answers."""
    if seat.count >= seat.lanes:
        return _NO_ROOM
    if seat.count and seat.lanes > LANES:
        child = seat.child
        if child is not None and child.waiting and now - child.waiting[0].started_at > STALL_S:
            return _NO_ROOM
        return (0, -seat.count)
    return (1, seat.count - seat.lanes)


def _exit_cause(code: int) -> str:
    """How a child process ended, from its exit code: ``killed by SIGKILL`` or ``exit code 1``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:  # a signal number Python has no name for
            return f"killed by signal {-code}"
    return f"exit code {code}"
