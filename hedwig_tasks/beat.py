"""The beat: publishes an app's periodic schedules, one tick once, however many beats run.

Any number of :class:`Beat` processes may run for one app. One holds the leader lease
``beat/<app>/leader`` in the state store and publishes; the others try to take the lease every
``poll_s`` and take over once it expires (at most ``lease_s`` plus ``poll_s`` after the leader
died; at once when it stops cleanly, since it releases the lease).

Each schedule has a cursor ``beat/<app>/<schedule>/last`` in the store: every tick at or before
it is done. The leader publishes each due tick with its deterministic message id
(:meth:`~hedwig_tasks.periodic.Schedule.tick_id`) and then moves the cursor to it by
compare-and-set from the value it read. So:

* a take-over never repeats a recorded tick: the new leader starts after the cursor;
* a leader that lost its lease (paused past it) finds the cursor moved when it records, and
  stops; it re-checks the lease at least every ``lease_s / 3`` before publishing;
* the one window left is a crash (or a lost lease) between a publish and its record: the next
  leader publishes that tick again, with the same message id and body. Consumers that drop
  repeated ids (idempotent handlers) see it once; others see a duplicate, as with any
  at-least-once broker. Nothing is lost: a tick is recorded only after its publish returned.

Missed ticks (no beat ran, or a take-over): a schedule with ``catch_up=True`` publishes every
one, oldest first, ``max_ticks_per_step`` at a time; otherwise ticks older than ``grace_s``
(default twice the lease, so a take-over loses none) are skipped, logged, and the cursor moves
past them. A schedule seen for the first time starts from now: nothing before it is due.

Time: which ticks are due is decided on the beat's ``clock`` (``time.time``; injectable), and
the lease's expiry on the store's clock (see :mod:`hedwig_tasks.state`). Run the beats' hosts
with synchronised clocks (NTP): a beat whose clock runs ahead publishes early.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hedwig_tasks.exceptions import HedwigError, StateError
from hedwig_tasks.message import Message
from hedwig_tasks.periodic import Schedule
from hedwig_tasks.state.base import StateStore

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig

__all__ = ["DEFAULT_LEASE_S", "Beat", "BeatOptions", "Published", "ScheduleRow"]

logger = logging.getLogger(__name__)

#: Seconds the leader lease lasts without renewal.
DEFAULT_LEASE_S = 10.0
#: Longest pause between two looks at the lease and the schedules, in seconds.
DEFAULT_POLL_S = 1.0
#: Ticks of one schedule published in one step while catching up.
DEFAULT_MAX_TICKS_PER_STEP = 100


@dataclasses.dataclass(frozen=True)
class BeatOptions:
    """How a beat leads: ``lease_s``, ``poll_s`` (default the lesser of ``lease_s / 5`` and 1 s),
    ``grace_s`` (default ``2 * lease_s``), ``max_ticks_per_step`` and its ``owner`` id (default
    ``host:pid:random``)."""

    lease_s: float = DEFAULT_LEASE_S
    poll_s: float | None = None
    grace_s: float | None = None
    max_ticks_per_step: int = DEFAULT_MAX_TICKS_PER_STEP
    owner: str | None = None

    def __post_init__(self) -> None:
        if not self.lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {self.lease_s!r}")
        if self.max_ticks_per_step < 1:
            raise ValueError(f"max_ticks_per_step must be >= 1, got {self.max_ticks_per_step!r}")

    @property
    def poll_every_s(self) -> float:
        return self.poll_s if self.poll_s is not None else min(self.lease_s / 5, DEFAULT_POLL_S)

    @property
    def grace_every_s(self) -> float:
        return self.grace_s if self.grace_s is not None else 2 * self.lease_s


@dataclasses.dataclass(frozen=True)
class Published:
    """One tick a beat published: the schedule, the tick (epoch seconds) and the message id."""

    schedule: str
    tick: int
    message_id: str


@dataclasses.dataclass(frozen=True)
class ScheduleRow:
    """What ``beat --list`` shows of one schedule: its next run and the last tick recorded."""

    schedule: Schedule
    next_run: int
    last_tick: int | None


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Beat:
    """Publishes ``app``'s schedules while it holds the leader lease; :meth:`run` until :meth:`stop`.

    ``store`` defaults to the app's state store, ``schedules`` to the app's. Tests drive
    :meth:`step` themselves with an injected ``clock``.
    """

    def __init__(
        self,
        app: Hedwig,
        *,
        store: StateStore | None = None,
        schedules: Sequence[Schedule] | None = None,
        options: BeatOptions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.store = store if store is not None else app.state
        self.schedules = list(schedules if schedules is not None else app.schedules.values())
        self.options = options or BeatOptions()
        self.owner = self.options.owner or _default_owner()
        self.clock = clock
        self.lease_name = f"beat/{app.name}/leader"
        self.is_leader = False
        self._cursors: dict[str, int] = {}  # valid while this beat has led without a break
        self._confirmed_at = -float("inf")  # monotonic time the lease was last confirmed
        self._stopping = threading.Event()

    def cursor_key(self, schedule: Schedule) -> str:
        return f"beat/{self.app.name}/{schedule.name}/last"

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[Published]:
        """Take or keep the lease; as leader publish every tick now due. Returns what it published.

        Raises ``StateError`` when the store fails (this beat then does not count as leader).
        """
        now = self.clock()
        published: list[Published] = []
        try:
            if not self._lead():
                return []
            for schedule in self.schedules:
                published += self._publish_due(schedule, now)
                if not self.is_leader:
                    break
        except StateError:
            self._step_down("the state store failed")  # a cursor's write may or may not have landed: read again
            raise
        return published

    def _lead(self) -> bool:
        held = self.store.acquire(self.lease_name, self.owner, ttl_s=self.options.lease_s)
        if held and not self.is_leader:
            logger.info("beat %s leads %s (%d schedules)", self.owner, self.app.name, len(self.schedules))
            self._cursors.clear()
        elif not held and self.is_leader:
            self._step_down("another beat holds the lease")
        self.is_leader = held
        if held:
            self._confirmed_at = time.monotonic()
        return held

    def _step_down(self, why: str) -> None:
        if self.is_leader:
            logger.warning("beat %s no longer leads %s: %s", self.owner, self.app.name, why)
        self.is_leader = False
        self._cursors.clear()

    def _still_leading(self) -> bool:
        """Confirm the lease when it was last confirmed a third of it ago (a pause may have lost it)."""
        if time.monotonic() - self._confirmed_at < self.options.lease_s / 3:
            return True
        if self.store.renew(self.lease_name, self.owner, ttl_s=self.options.lease_s):
            self._confirmed_at = time.monotonic()
            return True
        self._step_down("its lease ran out")
        return False

    def _cursor(self, schedule: Schedule, now: float) -> int:
        if schedule.name in self._cursors:
            return self._cursors[schedule.name]
        key = self.cursor_key(schedule)
        raw = self.store.get(key)
        if raw is None:
            start = str(int(now))  # a new schedule: nothing before now is due
            raw = start if self.store.compare_and_set(key, None, start) else self.store.get(key)
        cursor = int(raw or now)
        self._cursors[schedule.name] = cursor
        return cursor

    def _advance(self, schedule: Schedule, cursor: int, to: int) -> bool:
        if self.store.compare_and_set(self.cursor_key(schedule), str(cursor), str(to)):
            self._cursors[schedule.name] = to
            return True
        self._step_down(f"schedule {schedule.name}'s cursor moved under it (another beat led meanwhile)")
        return False

    def _publish_due(self, schedule: Schedule, now: float) -> list[Published]:
        cursor = self._cursor(schedule, now)
        oldest = int(now - self.options.grace_every_s)
        if not schedule.catch_up and schedule.next_after(cursor) <= oldest:
            logger.warning(
                "beat: schedule %s skips the ticks after %d up to %d (older than %.0fs; catch_up=False)",
                schedule.name,
                cursor,
                oldest,
                self.options.grace_every_s,
            )
            if not self._advance(schedule, cursor, oldest):
                return []
            cursor = oldest
        published: list[Published] = []
        for tick in schedule.ticks(cursor, now):
            if len(published) >= self.options.max_ticks_per_step or not self._still_leading():
                break
            message_id = self._publish(schedule, tick)
            if message_id is None or not self._advance(schedule, cursor, tick):
                break
            published.append(Published(schedule.name, tick, message_id))
            cursor = tick
        return published

    def _publish(self, schedule: Schedule, tick: int) -> str | None:
        message = Message.new(
            schedule.message_type,
            schedule.version,
            dict(schedule.data),
            schedule.headers,
            id=schedule.tick_id(self.app.name, tick),
            publisher=self.app.publisher,
            timestamp=tick * 1000,
        )
        try:
            self.app.publish_message(message)
        except HedwigError as exc:
            logger.error(
                "beat: schedule %s tick %d id=%s not published, retrying: %s", schedule.name, tick, message.id, exc
            )
            return None
        logger.info("beat: schedule %s tick %d published id=%s", schedule.name, tick, message.id)
        return message.id

    # -- running ----------------------------------------------------------------------------

    def _pause_s(self) -> float:
        """Until the next look: ``poll_s``, or sooner when a leader's next tick is due."""
        pause = self.options.poll_every_s
        if self.is_leader and self._cursors:
            now = self.clock()
            due = min(s.next_after(self._cursors.get(s.name, now)) for s in self.schedules)
            pause = min(pause, max(0.0, due - now))
        return pause

    def run(self) -> None:
        """Step until :meth:`stop`; store and broker failures are logged and retried. Releases the lease at the end."""
        logger.info(
            "beat %s for %s: %d schedules, lease %.1fs",
            self.owner,
            self.app.name,
            len(self.schedules),
            self.options.lease_s,
        )
        try:
            while not self._stopping.is_set():
                try:
                    self.step()
                except HedwigError as exc:
                    logger.error("beat %s: %s; trying again in %.1fs", self.owner, exc, self.options.poll_every_s)
                self._stopping.wait(self._pause_s())
        finally:
            self.release()

    def stop(self) -> None:
        """Ask :meth:`run` to return (after releasing the lease); safe from a signal handler."""
        self._stopping.set()

    def release(self) -> None:
        """Give the lease up now if held, so another beat takes over at its next poll."""
        if not self.is_leader:
            return
        try:
            self.store.release(self.lease_name, self.owner)
        except StateError as exc:
            logger.warning("beat %s could not release its lease (it expires by itself): %s", self.owner, exc)
        self.is_leader = False
        self._cursors.clear()
        logger.info("beat %s released the lease of %s", self.owner, self.app.name)

    # -- listing ----------------------------------------------------------------------------

    def plan(self) -> list[ScheduleRow]:
        """Each schedule's next run (from its recorded cursor and now) and its last recorded tick."""
        now = self.clock()
        rows = []
        for schedule in self.schedules:
            raw = self.store.get(self.cursor_key(schedule))
            last = None if raw is None else int(raw)
            if last is None:
                start = now
            elif schedule.catch_up:
                start = last
            else:
                start = max(last, now - self.options.grace_every_s)
            rows.append(ScheduleRow(schedule, schedule.next_after(start), last))
        return rows
