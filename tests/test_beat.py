"""The beat: every tick published once however many beats run, a dead leader replaced within one
lease, missed ticks skipped or caught up, a stale leader fenced off; on every store.

Beats here are stepped by the test on an injected clock ("five minutes of one-second ticks" in
a moment). On SQLite the store shares that clock, so a lease runs out when the test says; Redis
and PostgreSQL keep the lease's time themselves, so a take-over there waits for real time.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import wait_for
from postgres_server import own_schema
from redis_server import redis_url

from hedwig_tasks import Hedwig, Message
from hedwig_tasks.beat import Beat, BeatOptions
from hedwig_tasks.conf import build_app
from hedwig_tasks.exceptions import ConfigurationError, ValidationError
from hedwig_tasks.periodic import Schedule
from hedwig_tasks.settings import HedwigSettings
from hedwig_tasks.state.base import StateStore
from hedwig_tasks.state.postgres import PostgresStore
from hedwig_tasks.state.redis import RedisStore
from hedwig_tasks.state.sqlite import SQLiteStore
from hedwig_tasks.testing.contract import ManualClock

SCHEMA = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "schema.json"
START = 1_700_000_000.0
EMAIL = {"to": "ops@example.com", "subject": "tick"}


class Recorder:
    """An eager app whose periodic handler records each message it receives (id, tick)."""

    def __init__(self, name: str, **periodic: Any) -> None:
        self.app = Hedwig(name, schema=SCHEMA, eager=True)
        self.seen: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        options = {"every": dt.timedelta(seconds=1), "data": EMAIL, **periodic}

        @self.app.periodic("send_email", "1.1", **options)
        def record(message: Message) -> None:
            with self.lock:
                self.seen.append((message.id, message.timestamp // 1000))

    @property
    def schedule(self) -> Any:
        return next(iter(self.app.schedules.values()))

    def ticks(self) -> list[int]:
        return [tick for _, tick in self.seen]

    def assert_each_tick_once(self, first: int, last: int) -> None:
        assert self.ticks() == list(range(first, last + 1))  # in order, none missing, none twice
        assert [i for i, _ in self.seen] == [self.schedule.tick_id(self.app.name, t) for t in self.ticks()]


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def pg_schema() -> Iterator[tuple[str, str]]:
    with own_schema() as found:
        yield found


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def sqlite_stores(clock: ManualClock, tmp_path: Path) -> Iterator[list[StateStore]]:
    """Three clients of one SQLite store on the test's clock."""
    made: list[StateStore] = [SQLiteStore(tmp_path / "state.db", clock=clock) for _ in range(3)]
    yield made
    for store in made:
        store.close()


@pytest.fixture
def stores(kind: str, clock: ManualClock, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[StateStore]]:
    """Three clients of one fresh store (one per beat, as three processes would have)."""
    made: list[StateStore] = []
    if kind == "sqlite":
        made = [SQLiteStore(tmp_path / "state.db", clock=clock) for _ in range(3)]
    elif kind == "redis":
        prefix = f"hedwig-test:{uuid.uuid4().hex[:10]}:"
        made = [RedisStore(redis_url(), prefix=prefix) for _ in range(3)]
    else:
        url, schema = request.getfixturevalue("pg_schema")
        table = f"beat_{uuid.uuid4().hex[:8]}"
        made = [PostgresStore(url, schema=schema, table=table) for _ in range(3)]
    yield made
    for store in made:
        store.close()
    if kind == "redis":
        client = redis.Redis.from_url(redis_url())
        keys = list(client.scan_iter(match=f"{made[0].prefix}*"))  # type: ignore[attr-defined]
        if keys:
            client.delete(*keys)
        client.close()


def _lease_s(kind: str) -> float:
    return 5.0 if kind == "sqlite" else 1.0  # SQLite's lease runs on the test's clock


def _take_over(kind: str, beats: list[Beat], clock: ManualClock, lease_s: float) -> float:
    """Step the beats until one leads; returns how long that took (test-clock or real seconds)."""
    started, real_started = clock(), time.monotonic()
    while not any(b.is_leader for b in beats):
        if kind == "sqlite":
            clock.advance(1)
        else:
            time.sleep(0.02)  # the server's clock runs the lease out; the ticks' clock waits
        for beat in beats:
            beat.step()
        assert time.monotonic() - real_started < 10 * lease_s + 10, "no beat took over"
    return clock() - started if kind == "sqlite" else time.monotonic() - real_started


@pytest.mark.parametrize("count", [2, 3])
def test_every_tick_once_over_five_minutes_and_a_dead_leader_replaced_within_a_lease(
    kind: str, count: int, stores: list[StateStore], clock: ManualClock
) -> None:
    lease_s = _lease_s(kind)
    recorder = Recorder(f"beat-{uuid.uuid4().hex[:6]}")
    beats = [Beat(recorder.app, store=s, clock=clock, options=BeatOptions(lease_s=lease_s)) for s in stores[:count]]
    for second in range(300):
        clock.advance(1)
        for beat in beats:
            beat.step()
        assert sum(b.is_leader for b in beats) == 1
        if second == 150:  # kill -9 of the leader: it stops stepping and never releases its lease
            leader = next(b for b in beats if b.is_leader)
            killed_at = clock()
            beats.remove(leader)
            took = _take_over(kind, beats, clock, lease_s)
            assert took <= lease_s + 1.5  # one lease, and the poll that notices it ran out
            assert max(recorder.ticks()) >= int(killed_at)  # nothing was lost in the take-over
    recorder.assert_each_tick_once(int(START) + 2, int(clock()))


def test_missed_ticks_are_caught_up_or_skipped_per_schedule(
    sqlite_stores: list[StateStore], clock: ManualClock
) -> None:
    stores = sqlite_stores
    catching = Recorder(f"beat-{uuid.uuid4().hex[:6]}", catch_up=True)
    skipping = Recorder(f"beat-{uuid.uuid4().hex[:6]}")
    options = BeatOptions(lease_s=_lease_s("sqlite"), grace_s=10, max_ticks_per_step=50)
    beats = [Beat(r.app, store=stores[0], clock=clock, options=options) for r in (catching, skipping)]
    for beat in beats:
        beat.step()  # the schedules start now
    clock.advance(200)  # no beat ran for 200 s
    for _ in range(5):
        for beat in beats:
            beat.step()
    catching.assert_each_tick_once(int(START) + 1, int(START) + 200)  # 50 a step, oldest first
    assert skipping.ticks() == list(range(int(START) + 191, int(START) + 201))  # those within the grace


def test_a_leader_that_lost_its_lease_publishes_nothing_more(
    sqlite_stores: list[StateStore], clock: ManualClock
) -> None:
    stores = sqlite_stores
    recorder = Recorder(f"beat-{uuid.uuid4().hex[:6]}")
    options = BeatOptions(lease_s=5)
    paused, other = (Beat(recorder.app, store=s, clock=clock, options=options) for s in stores[:2])
    paused.step()
    clock.advance(1)
    assert paused.step() and paused.is_leader
    clock.advance(10)  # paused past its lease: the other takes over and publishes
    assert other.step() and other.is_leader
    published = len(recorder.seen)
    assert paused.step() == [] and not paused.is_leader
    assert len(recorder.seen) == published


def test_the_window_between_publish_and_record_repeats_a_tick_with_its_own_id(
    sqlite_stores: list[StateStore], clock: ManualClock
) -> None:
    stores = sqlite_stores
    recorder = Recorder(f"beat-{uuid.uuid4().hex[:6]}")
    options = BeatOptions(lease_s=5, grace_s=100)
    stale, other = (Beat(recorder.app, store=s, clock=clock, options=options) for s in stores[:2])
    stale.step()
    clock.advance(10)
    other.step()
    clock.advance(1)
    other.step()  # the other leads and has published ticks START+1 .. START+11
    stale.is_leader, stale._confirmed_at = True, time.monotonic()  # a leader paused just before publishing
    assert stale._publish_due(recorder.schedule, clock()) == []  # it publishes, finds the cursor moved, stops
    assert not stale.is_leader
    repeated = [entry for entry in recorder.seen if entry[1] == int(START) + 1]
    assert len(recorder.seen) == 12
    assert len(repeated) == 2 and repeated[0] == repeated[1]  # a duplicate of one id, which idempotent consumers drop


def test_a_failed_publish_is_retried_at_the_next_step(tmp_path: Path, clock: ManualClock) -> None:
    app = Hedwig(f"beat-{uuid.uuid4().hex[:6]}", schema=SCHEMA, transport="memory://")
    app.add_periodic("send_email", "1.1", every=dt.timedelta(seconds=1), data=EMAIL)
    with SQLiteStore(tmp_path / "s.db", clock=clock) as store:
        beat = Beat(app, store=store, clock=clock)
        beat.step()
        clock.advance(3)
        assert beat.step() == []  # the topic does not exist yet: PublishError, logged, cursor kept
        app.provision(topics=["send_email-v1"])
        assert [p.tick for p in beat.step()] == [int(START) + 1, int(START) + 2, int(START) + 3]
    app.close()


def test_cron_schedules_tick_on_the_minutes_they_name(tmp_path: Path) -> None:
    clock = ManualClock(dt.datetime(2024, 5, 1, 12, 0, 30, tzinfo=dt.timezone.utc).timestamp())
    recorder = Recorder(f"beat-{uuid.uuid4().hex[:6]}", every=None, cron="*/5 * * * *", tz="Europe/Paris")
    with SQLiteStore(tmp_path / "s.db", clock=clock) as store:
        beat = Beat(recorder.app, store=store, clock=clock)
        for _ in range(360):  # an hour, a look every 10 s (the grace is 20 s)
            beat.step()
            clock.advance(10)
    local = [dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%H:%M") for t in recorder.ticks()]
    assert local == [f"{12 + m // 60}:{m % 60:02d}" for m in range(5, 61, 5)]


def test_run_publishes_on_time_and_stop_releases_the_lease(tmp_path: Path) -> None:
    recorder = Recorder(f"beat-{uuid.uuid4().hex[:6]}")
    store = SQLiteStore(tmp_path / "s.db")
    beat = Beat(recorder.app, store=store, options=BeatOptions(lease_s=2))
    thread = threading.Thread(target=beat.run)
    thread.start()
    try:
        wait_for(lambda: len(recorder.seen) >= 2, timeout_s=10)
        lag_s = time.time() - recorder.ticks()[-1]
        assert lag_s < 0.9  # published within the tick's second, not at the next poll
    finally:
        beat.stop()
        thread.join(10)
    assert not thread.is_alive()
    assert store.holder(beat.lease_name) is None  # released: another takes over at once
    store.close()


def test_settings_and_the_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEDWIG_STATE_URL", raising=False)
    app = build_app(
        HedwigSettings.read(
            {
                "HEDWIG_QUEUE": "svc",
                "HEDWIG_JSONSCHEMA_FILE": str(SCHEMA),
                "HEDWIG_STATE_URL": f"sqlite:///{tmp_path}/x.db",
            }
        )
    )
    assert isinstance(app.state, SQLiteStore) and app.state.path == tmp_path / "x.db"
    app.close()
    beside = Hedwig("svc", schema=SCHEMA, transport=f"sqlite:///{tmp_path}/bus/bus.db")
    assert isinstance(beside.state, SQLiteStore) and beside.state.path == tmp_path / "bus" / "state.db"
    beside.close()


def test_periodic_declarations_are_checked() -> None:
    app = Hedwig("svc", schema=SCHEMA)
    with pytest.raises(ValidationError, match="subject"):  # the schema's verdict on the data, at declaration
        app.add_periodic("send_email", "1.1", every=60, data={"to": "x"})
    app.add_periodic("send_email", "1.1", every=60, data=EMAIL)
    with pytest.raises(ConfigurationError, match=r"give this one name="):
        app.add_periodic("send_email", "1.1", cron="@daily", data=EMAIL)
    app.add_periodic("send_email", "1.0", cron="@daily", data=EMAIL, name="daily")
    assert sorted(app.schedules) == ["daily", "send_email"]


# -- real processes through the CLI -----------------------------------------------------------

TASKS = """
import datetime as dt
from pathlib import Path
from hedwig_tasks import Hedwig, Message

hedwig = Hedwig("beatapp", schema=Path(__file__).with_name("schema.json"))


@hedwig.periodic("send_email", "1.1", every=dt.timedelta(seconds=1), data={"to": "ops@example.com", "subject": "t"})
def tick(message: Message) -> None:
    pass
"""


def _leader_pid(store: SQLiteStore) -> int | None:
    lease = store.holder("beat/beatapp/leader")
    return None if lease is None else int(lease.owner.split(":")[1])


@pytest.mark.slow
def test_three_beat_processes_publish_each_tick_once_and_survive_a_kill_9(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from cli_helpers import UNSET, cli

    from hedwig_tasks.transports import from_url

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "schema.json").write_text(SCHEMA.read_text())
    (folder / "tasks.py").write_text(TASKS)
    assert cli(folder, "provision", "-A", "tasks").returncode == 0
    listing = cli(folder, "beat", "-A", "tasks", "--list")
    assert listing.returncode == 0 and "send_email 1.1" in listing.stdout and "every 1s" in listing.stdout
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    beats = [
        subprocess.Popen(
            [sys.executable, "-m", "hedwig_tasks", "beat", "-A", "tasks", "--lease", "2"],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(3)
    ]
    store = SQLiteStore(folder / ".hedwig" / "state.db")
    cursor = "beat/beatapp/send_email/last"
    try:
        wait_for(lambda: _leader_pid(store) is not None and int(store.get(cursor) or 0) >= time.time() - 1, 30)
        first = int(store.get(cursor) or 0)
        wait_for(lambda: int(store.get(cursor) or 0) >= first + 3, 10)
        leader = _leader_pid(store)
        victim = next(b for b in beats if b.pid == leader)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        last_before = int(store.get(cursor) or 0)
        wait_for(lambda: int(store.get(cursor) or 0) > last_before, 10)
        # one lease, the tick's second, one poll, and slack for a CI machine whose two cores are busy
        assert time.monotonic() - killed_at <= 2 + 1 + 0.4 + 2.0
        assert _leader_pid(store) not in (None, leader)
        wait_for(lambda: int(store.get(cursor) or 0) >= last_before + 3, 10)
    finally:
        for process in beats:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = [process.wait(20) for process in beats]
        store.close()
    assert sorted(codes) == [-signal.SIGKILL, 0, 0]
    transport = from_url(f"sqlite:///{folder}/.hedwig/bus.db")
    consumer = transport.consumer("beatapp", ["send_email-v1"])
    ids: list[str] = []
    while batch := consumer.receive(10, 0.1):
        ids += [d.attributes["hedwig_id"] for d in batch]
    consumer.close()
    transport.close()
    schedule = Schedule.build("send_email", "1.1", every=1)
    last = int(time.time())
    ticks = [t for t in range(last - 120, last + 1) if schedule.tick_id("beatapp", t) in set(ids)]
    assert len(ticks) == len(set(ids)) >= 6  # every id is a tick's own
    assert ticks == list(range(ticks[0], ticks[-1] + 1))  # none missing
    # none repeated, but for the one window a kill -9 can hit: between a tick's publish and its record
    assert len(ids) - len(set(ids)) <= 1
