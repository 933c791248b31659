"""Redis Streams: hedwig-tasks against a plain redis-py loop, Dramatiq and Celery, on one Redis.

Three measurements, each in rounds whose order of contenders rotates (round r starts with
the r-th), reported as the median over rounds with the spread (lowest and highest round).
Every contender gets keys of its own (a random tag), deleted after its run; the database is
never flushed. Messages are ``{"user_id": ..., "n": ..., "sent_at": ...}``.

**drain**: ``--messages`` messages are in the broker before the consumer starts; one process
consumes them all. The figure is messages per second from the first to the last handler call
(start-up excluded, it is reported apart as ``wall_s``, from spawning the process). The
handler notes the time and counts; nothing else.

* ``hedwig_tasks``: ``hedwig-tasks worker -c 4 --prefetch 12 --burst`` (so at most 16 messages
  held), JSON-schema validation on, tracing as by default (API only). The streams are filled
  with pipelined ``XADD`` of the entries the Hedwig library writes (``hedwig_payload`` and the
  attributes) after ``provision`` made the group.
* ``plain_redis_py``: one thread: ``XREADGROUP COUNT 16 BLOCK`` over the same two streams (the
  topic's and the queue's own), ``json.loads`` of each ``hedwig_payload``, the handler, one
  ``XACK`` for the batch. No validation, no lease keeping, no retries, no dead letters.
* ``dramatiq``: ``dramatiq -p 1 -t 4`` on ``RedisBroker`` with its default middleware,
  prefetch (twice the threads: 8) and acknowledgement after the handler; filled by
  ``actor.send``. No schema.

Where the drain still differs: only hedwig-tasks validates each message against its schema,
keeps leases and runs the worker's bookkeeping (signals, tracing context, counts); the plain
loop holds 16 at once as the worker does but handles them on one thread. Dramatiq reads with a
Lua script rather than a blocking read, sleeps with a growing backoff whenever its prefetch is
full or the queue is empty, and acknowledges each message with its own script call: that is
its default design, and what bounds it here.

**publish**, from one thread of this process, ``--publish-messages`` each, in chunks of 500
that the contenders take in turn (so a busy moment of the machine hits all of them):
``hedwig_tasks`` (``Hedwig.publish``: validate, encode, one ``XADD``), ``dramatiq``
(``actor.send``), ``plain_xadd`` (``json.dumps`` and one ``XADD`` with the same fields, no
validation); and batched: ``hedwig_tasks_many`` (``app.encode`` each, then
``transport.publish_many`` a hundred at a time) against ``plain_pipeline`` (a redis-py
pipeline of a hundred ``XADD``). Round trips are counted on redis-py's connections, and
``cpu_us`` is the publishing thread's CPU time per message (the client's own work, which a busy
machine does not blur as it blurs wall time). hedwig-tasks writes each ``XADD`` on a connection
its thread keeps, without redis-py's client layer (pool, poll, retry wrapper), which the other
contenders go through.

redis-py parses replies with ``hiredis`` when it is installed, for every contender alike (and
every worker process); the JSON line says whether it was (``hiredis``). Measured on this
bench's machine, hiredis cut hedwig-tasks's CPU per publish by about a third and raised its
drain by 0-30%, and moved no ratio beyond the spread between runs.

**latency**: a worker process runs, warmed up by one message; then ``--latency-messages`` are
published at ``--rate`` per second (paced by the clock) and the handler notes ``now -
sent_at``, ``sent_at`` taken just before the publish call. ``hedwig_tasks``: ``hedwig-tasks
worker -c 4`` (default prefetch); ``celery``: ``celery worker -P threads -c 4`` with
``task_acks_late``, default prefetch multiplier (4), no gossip/mingle/heartbeat, on Kombu's
Redis transport (its unacked store under keys of its own). The figure is each round's p99.
Celery publishes through ``apply_async`` (one ``LPUSH`` by Kombu, no schema) and its worker
takes messages with ``BRPOP``; hedwig-tasks validates at publish and on receive.

Usage::

    python bench/redis.py [--messages 20000] [--publish-messages 5000] [--latency-messages 1000]
                          [--rate 100] [--rounds 3] [--parts drain,publish,latency] [--url URL]

Progress goes to stderr; stdout gets ONE JSON line with every contender's figures (median,
spread and each round's), a ``ratio`` per comparison (of the medians; throughput: hedwig-tasks
over the other; latency: hedwig-tasks's p99 over Celery's, lower is better), the same ratio in
each round (``round_ratios``), and whether the issue's targets were met.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

# This file is named like the library it measures: never let ``import redis`` find it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import redis  # noqa: E402
import redis.connection  # noqa: E402

from hedwig_tasks import Hedwig  # noqa: E402

URL = os.environ.get("HEDWIG_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
#: Messages a drain consumer may hold: hedwig-tasks -c 4 plus --prefetch 12; the plain loop's COUNT.
HELD = 16
CONCURRENCY = 4
#: Messages per publish_many call and per plain pipeline.
BATCH = 100
#: Messages each publisher sends before the next takes its turn.
PUBLISH_CHUNK = 500
#: Longest one run may take, in seconds.
TIMEOUT_S = 600.0
TARGETS = {"drain_vs_plain_min": 0.25, "drain_vs_dramatiq_min": 3.0, "publish_vs_dramatiq_min": 1.5}
TARGETS_MAX = {"latency_p99_vs_celery_max": 1.0}

SCHEMA = {
    "id": "https://hedwig-tasks.bench/schema",
    "$schema": "http://json-schema.org/draft-04/schema",
    "schemas": {
        "user-created": {
            "1.*": {
                "type": "object",
                "x-version": "1.0",
                "required": ["user_id", "n"],
                "properties": {"user_id": {"type": "string"}, "n": {"type": "integer"}, "sent_at": {"type": "number"}},
            }
        }
    },
}

# The helper modules, written to a temporary folder that goes on the children's PYTHONPATH.
TALLY = '''
import itertools, json, os, time
_count = itertools.count(1)
_first, _latencies = [], []

def handled(n, sent_at=None):
    """Note one handler call; n < 0 is a warm-up. Writes BENCH_OUT when BENCH_N were handled."""
    now = time.time()
    if n < 0:
        open(os.environ["BENCH_OUT"] + ".ready", "w").close()
        return
    if sent_at is not None:
        _latencies.append(now - sent_at)
    count = next(_count)
    if count == 1:
        _first.append(now)
    if count == int(os.environ["BENCH_N"]):
        out = os.environ["BENCH_OUT"]
        with open(out + ".partial", "w") as f:
            json.dump({"first_at": _first[0], "done_at": now, "latencies": _latencies}, f)
        os.replace(out + ".partial", out)
'''

HEDWIG_APP = """
import os
from hedwig_tasks import Hedwig
from bench_tally import handled

hedwig = Hedwig(os.environ["BENCH_TAG"], schema=os.environ["BENCH_SCHEMA"],
                routing={"user-created": os.environ["BENCH_TOPIC"]})

@hedwig.handler("user-created", "1.*")
def user_created(message):
    handled(message.data["n"], message.data.get("sent_at"))
"""

PLAIN_LOOP = """
import json, os, uuid
import redis
from bench_tally import handled

client = redis.Redis.from_url(os.environ["BENCH_URL"])
group, consumer, left = os.environ["BENCH_TAG"], uuid.uuid4().hex, int(os.environ["BENCH_N"])
streams = {name: ">" for name in os.environ["BENCH_STREAMS"].split(",")}
while left > 0:
    for stream, entries in client.xreadgroup(group, consumer, streams, count=int(os.environ["BENCH_HELD"]), block=1000):
        for _, fields in entries:
            data = json.loads(fields[b"hedwig_payload"])
            handled(data["n"], data.get("sent_at"))
        client.xack(stream, group, *[entry_id for entry_id, _ in entries])
        left -= len(entries)
"""

DRAMATIQ_APP = """
import os
import dramatiq
from dramatiq.brokers.redis import RedisBroker
from bench_tally import handled

broker = RedisBroker(url=os.environ["BENCH_URL"], namespace=os.environ["BENCH_TAG"])
dramatiq.set_broker(broker)

@dramatiq.actor(actor_name="user_created", queue_name=os.environ["BENCH_TAG"])
def user_created(user_id, n, sent_at=None):
    handled(n, sent_at)
"""

CELERY_APP = """
import os
from celery import Celery
from bench_tally import handled

tag = os.environ["BENCH_TAG"]
app = Celery("bench", broker=os.environ["BENCH_URL"])
app.conf.update(task_ignore_result=True, task_acks_late=True, task_default_queue=tag,
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                broker_transport_options={"unacked_key": tag + "-unacked",
                                          "unacked_index_key": tag + "-unacked-index",
                                          "unacked_mutex_key": tag + "-unacked-mutex"})

@app.task(name="bench.user_created")
def user_created(user_id, n, sent_at=None):
    handled(n, sent_at)
"""

MODULES = {
    "bench_tally": TALLY,
    "bench_hedwig_app": HEDWIG_APP,
    "bench_plain": PLAIN_LOOP,
    "bench_dramatiq_app": DRAMATIQ_APP,
    "bench_celery_app": CELERY_APP,
}


class BenchError(Exception):
    """A run did not finish, or left messages behind."""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _data(n: int, sent_at: float | None = None) -> dict[str, Any]:
    return {"user_id": f"U{n}", "n": n} if sent_at is None else {"user_id": f"U{n}", "n": n, "sent_at": sent_at}


class Run:
    """One contender's run: its tag (every key it makes contains it), files and worker process."""

    def __init__(self, workdir: Path, url: str, n: int) -> None:
        self.tag = f"bench-redis-{uuid.uuid4().hex[:10]}"
        self.topic = f"{self.tag}-topic"  # the queue is the tag: its own stream must differ
        self.url = url
        self.out = workdir / f"{self.tag}.json"
        self.client = redis.Redis.from_url(url)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "HEDWIG_"))},
            "BENCH_TAG": self.tag,
            "BENCH_TOPIC": self.topic,
            "BENCH_URL": url,
            "BENCH_N": str(n),
            "BENCH_OUT": str(self.out),
            "BENCH_SCHEMA": str(workdir / "schema.json"),
            "BENCH_HELD": str(HELD),
            "HEDWIG_TRANSPORT_URL": url,
            "PYTHONPATH": os.pathsep.join([str(workdir), *sys.path[1:]]),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.log = workdir / f"{self.tag}.log"

    def hedwig_app(self) -> Hedwig:
        schema = Path(self.env["BENCH_SCHEMA"])
        app = Hedwig(self.tag, schema=schema, transport=self.url, routing={"user-created": self.topic})
        app.handler("user-created", "1.*")(lambda message: None)
        return app

    def start(self, command: list[str], **env: str) -> None:
        self.spawned_at = time.time()
        with self.log.open("wb") as log_file:
            self.process = subprocess.Popen(
                command, env={**self.env, **env}, cwd=self.out.parent, stdout=log_file, stderr=log_file,
                start_new_session=True,
            )  # fmt: skip

    def wait_for(self, path: Path, timeout_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if self.process is not None and self.process.poll() is not None:
                raise BenchError(f"{self.tag}: exited {self.process.returncode}; log ends:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.tag}: {path.name} not written in {timeout_s:.0f}s; log:\n{self.log_tail()}")
            time.sleep(0.005)

    def result(self) -> dict[str, Any]:
        self.wait_for(self.out)
        value: dict[str, Any] = json.loads(self.out.read_text())
        return value

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:]) if self.log.exists() else ""

    def exit(self, *, terminate: bool, timeout_s: float = 60.0) -> int | None:
        """Wait for the worker to exit (after SIGTERM to its session with ``terminate``); kill at the deadline."""
        if self.process is None:
            return None
        if terminate and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise BenchError(f"{self.tag}: did not exit in {timeout_s:.0f}s; log:\n{self.log_tail()}") from None

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        keys = list(self.client.scan_iter(match=f"*{self.tag}*", count=1000))
        if keys:
            self.client.delete(*keys)
        self.client.close()


@contextmanager
def run_of(workdir: Path, url: str, n: int) -> Iterator[Run]:
    run = Run(workdir, url, n)
    try:
        yield run
    finally:
        run.cleanup()


# -- drain ----------------------------------------------------------------------------------------


def hedwig_entries(run: Run, n: int) -> Iterator[dict[str, str]]:
    """The stream entries the Hedwig library writes for ``n`` messages: payload plus attributes."""
    encoder = Hedwig(run.tag, schema=Path(run.env["BENCH_SCHEMA"]), transport="memory://")
    for number in range(n):
        body, attributes = encoder.encode(encoder.message("user-created", "1.0", _data(number)), text_only=True)
        yield {"hedwig_payload": body.decode(), **attributes}


def fill_stream(client: redis.Redis, stream: str, entries: Iterator[dict[str, str]]) -> None:
    pipe = client.pipeline(transaction=False)
    for index, fields in enumerate(entries, 1):
        pipe.xadd(stream, fields)  # type: ignore[arg-type]
        if index % 1000 == 0:
            pipe.execute()
    pipe.execute()


def check_streams_settled(run: Run, streams: list[str]) -> None:
    for stream in filter(run.client.exists, streams):
        for group in run.client.xinfo_groups(stream):
            if group["pending"] or group.get("lag"):
                raise BenchError(f"{run.tag}: {stream} group {group['name']!r} left {group}")


def drain_hedwig(run: Run, n: int) -> dict[str, Any]:
    app = run.hedwig_app()
    app.provision()
    app.close()
    fill_stream(run.client, f"hedwig:{run.topic}", hedwig_entries(run, n))
    command = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "bench_hedwig_app", "-l", "WARNING"]
    run.start([*command, "-c", str(CONCURRENCY), "--prefetch", str(HELD - CONCURRENCY), "--burst"])
    result = run.result()
    if run.exit(terminate=False) != 0:
        raise BenchError(f"{run.tag}: the burst worker exited {run.process and run.process.returncode}")
    check_streams_settled(run, [f"hedwig:{run.topic}", f"hedwig:{run.tag}"])
    return result


def drain_plain(run: Run, n: int) -> dict[str, Any]:
    streams = [f"hedwig:{run.topic}", f"hedwig:{run.tag}"]
    for stream in streams:
        run.client.xgroup_create(stream, run.tag, id="0", mkstream=True)
    fill_stream(run.client, streams[0], hedwig_entries(run, n))
    run.start([sys.executable, "-m", "bench_plain"], BENCH_STREAMS=",".join(streams))
    result = run.result()
    run.exit(terminate=False)
    check_streams_settled(run, streams)
    return result


def dramatiq_sender(run: Run) -> Any:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=run.url, namespace=run.tag)
    return dramatiq.actor(lambda **_: None, actor_name="user_created", queue_name=run.tag, broker=broker)


def drain_dramatiq(run: Run, n: int) -> dict[str, Any]:
    actor = dramatiq_sender(run)
    for number in range(n):
        actor.send(**_data(number))
    run.start([sys.executable, "-m", "dramatiq", "bench_dramatiq_app", "-p", "1", "-t", str(CONCURRENCY)])
    result = run.result()
    run.exit(terminate=True)
    left = run.client.llen(f"{run.tag}:{run.tag}") + run.client.hlen(f"{run.tag}:{run.tag}.msgs")
    if left:
        raise BenchError(f"{run.tag}: Dramatiq left {left} message(s)")
    actor.broker.close()
    return result


def drain_figures(run: Run, n: int, result: dict[str, Any]) -> dict[str, float]:
    return {
        "per_s": (n - 1) / max(result["done_at"] - result["first_at"], 1e-9),
        "wall_s": result["done_at"] - run.spawned_at,
    }


# -- publish --------------------------------------------------------------------------------------


class RoundTrips:
    """Counts what redis-py sends to the server while installed: one per command, one per pipeline."""

    def __init__(self) -> None:
        self.count = 0
        self._original = redis.connection.AbstractConnection.send_packed_command

    def __enter__(self) -> RoundTrips:
        original = self._original

        def send(connection: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            original(connection, command, check_health)

        redis.connection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        redis.connection.AbstractConnection.send_packed_command = self._original  # type: ignore[method-assign]


#: A publisher: ``send(n)`` publishes message n (or the batch from n with ``step`` > 1).
Sender = tuple[Callable[[int], object], int]


def hedwig_sender(run: Run, stack: ExitStack, *, many: bool = False) -> Sender:
    app = run.hedwig_app()
    stack.callback(app.close)
    app.provision()
    app.publish("user-created", "1.0", _data(-1))  # connect before the clock

    def batch(start: int) -> None:
        messages = [app.message("user-created", "1.0", _data(number)) for number in range(start, start + BATCH)]
        app.transport.publish_many(run.topic, [app.encode(message) for message in messages])

    if many:
        return batch, BATCH
    return (lambda number: app.publish("user-created", "1.0", _data(number))), 1


def _plain_fields(number: int) -> dict[str, str]:
    return {
        "hedwig_payload": json.dumps(_data(number)),
        "hedwig_format_version": "1.0",
        "hedwig_id": str(uuid.uuid4()),
        "hedwig_message_timestamp": str(int(time.time() * 1000)),
        "hedwig_publisher": "bench",
        "hedwig_schema": "https://hedwig-tasks.bench/schema#/schemas/user-created/1.0",
    }


def plain_sender(run: Run, stack: ExitStack, *, many: bool = False) -> Sender:
    stream = f"hedwig:{run.topic}"
    run.client.xadd(stream, _plain_fields(-1))  # type: ignore[arg-type]

    def batch(start: int) -> None:
        pipe = run.client.pipeline(transaction=False)
        for number in range(start, start + BATCH):
            pipe.xadd(stream, _plain_fields(number))  # type: ignore[arg-type]
        pipe.execute()

    if many:
        return batch, BATCH
    return (lambda number: run.client.xadd(stream, _plain_fields(number))), 1  # type: ignore[arg-type]


def dramatiq_sender_of(run: Run, stack: ExitStack) -> Sender:
    actor = dramatiq_sender(run)
    stack.callback(actor.broker.close)
    actor.send(**_data(-1))
    return (lambda number: actor.send(**_data(number))), 1


PUBLISHERS: dict[str, Callable[[Run, ExitStack], Sender]] = {
    "hedwig_tasks": hedwig_sender,
    "dramatiq": dramatiq_sender_of,
    "plain_xadd": plain_sender,
    "hedwig_tasks_many": lambda run, stack: hedwig_sender(run, stack, many=True),
    "plain_pipeline": lambda run, stack: plain_sender(run, stack, many=True),
}


def publish_round(workdir: Path, args: argparse.Namespace, m: int, order: list[str]) -> dict[str, dict[str, float]]:
    """Every contender publishes ``m``, in chunks taken in turn, so a busy moment hits them all."""
    elapsed = dict.fromkeys(order, 0.0)
    cpu = dict.fromkeys(order, 0.0)
    trips = dict.fromkeys(order, 0)
    with ExitStack() as stack:
        senders = {name: PUBLISHERS[name](stack.enter_context(run_of(workdir, args.url, m)), stack) for name in order}
        for chunk in range(0, m, PUBLISH_CHUNK):
            for name in order:
                send, step = senders[name]
                with RoundTrips() as counted:
                    started, started_cpu = time.perf_counter(), time.thread_time()
                    for number in range(chunk, min(chunk + PUBLISH_CHUNK, m), step):
                        send(number)
                    elapsed[name] += time.perf_counter() - started
                    cpu[name] += time.thread_time() - started_cpu
                trips[name] += counted.count
    return {
        name: {"per_s": m / elapsed[name], "cpu_us": cpu[name] / m * 1e6, "round_trips_per_message": trips[name] / m}
        for name in order
    }


# -- latency --------------------------------------------------------------------------------------


def paced(m: int, rate: float, publish: Callable[[int], object]) -> None:
    """Call ``publish(n)`` for n in range(m), the n-th at ``n / rate`` seconds from the start."""
    started = time.perf_counter()
    for number in range(m):
        delay = started + number / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)  # pacing the publisher, not waiting for the worker
        publish(number)


def latency_hedwig(run: Run, m: int, rate: float) -> dict[str, Any]:
    app = run.hedwig_app()
    app.provision()
    run.start([sys.executable, "-m", "hedwig_tasks", "worker", "-A", "bench_hedwig_app", "-c", str(CONCURRENCY)])
    try:
        app.publish("user-created", "1.0", _data(-1))
        run.wait_for(Path(f"{run.out}.ready"), 60)
        paced(m, rate, lambda number: app.publish("user-created", "1.0", _data(number, time.time())))
        result = run.result()
    finally:
        app.close()
    run.exit(terminate=True)
    return result


def latency_celery(run: Run, m: int, rate: float) -> dict[str, Any]:
    from celery import Celery

    app = Celery("bench", broker=run.url)
    app.conf.update(task_ignore_result=True, task_default_queue=run.tag, broker_connection_retry_on_startup=True)
    task = app.signature("bench.user_created")
    command = [sys.executable, "-m", "celery", "-A", "bench_celery_app", "worker", "-P", "threads", "-l", "WARNING"]
    run.start([*command, "-c", str(CONCURRENCY), "--without-gossip", "--without-mingle", "--without-heartbeat"])
    try:
        task.apply_async(kwargs=_data(-1))
        run.wait_for(Path(f"{run.out}.ready"), 60)
        paced(m, rate, lambda number: task.apply_async(kwargs=_data(number, time.time())))
        result = run.result()
    finally:
        app.close()
    run.exit(terminate=True)
    return result


def latency_figures(result: dict[str, Any]) -> dict[str, float]:
    ms = sorted(value * 1000 for value in result["latencies"])
    return {
        "p50_ms": ms[len(ms) // 2],
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "max_ms": ms[-1],
    }


# -- rounds and the report ------------------------------------------------------------------------


def rounds(
    workdir: Path, args: argparse.Namespace, n: int, contenders: dict[str, Callable[[Run], dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """Each contender once a round, the order rotated each round; figures by contender."""
    names = [name for name in contenders if not args.only or name in args.only.split(",")]
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            with run_of(workdir, args.url, n) as run:
                figures[name].append(contenders[name](run))
            log(f"  round {round_ + 1}: {name} {json.dumps({k: round(v, 2) for k, v in figures[name][-1].items()})}")
    return figures


def summary(values: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over rounds, with its spread (lowest and highest round)."""
    out: dict[str, Any] = {}
    for key in values[0]:
        series = [v[key] for v in values]
        out[key] = round(statistics.median(series), 3)
        out[f"{key}_spread"] = [round(min(series), 3), round(max(series), 3)]
        out[f"{key}_rounds"] = [round(value, 3) for value in series]
    return out


def drain(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = args.messages
    log(f"drain: {n} messages, {args.rounds} rounds")

    def contender(function: Callable[[Run, int], dict[str, Any]]) -> Callable[[Run], dict[str, Any]]:
        return lambda run: drain_figures(run, n, function(run, n))

    figures = rounds(
        workdir, args, n,
        {"hedwig_tasks": contender(drain_hedwig), "plain_redis_py": contender(drain_plain),
         "dramatiq": contender(drain_dramatiq)},
    )  # fmt: skip
    return {name: summary(values) for name, values in figures.items()}


def publish(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    m = args.publish_messages - args.publish_messages % PUBLISH_CHUNK
    log(f"publish: {m} messages from one thread, in chunks of {PUBLISH_CHUNK} taken in turn, {args.rounds} rounds")
    names = [name for name in PUBLISHERS if not args.only or name in args.only.split(",")]
    figures: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name, values in publish_round(workdir, args, m, order).items():
            figures[name].append(values)
            log(f"  round {round_ + 1}: {name} {json.dumps({k: round(v, 2) for k, v in values.items()})}")
    return {name: summary(values) for name, values in figures.items()}


def latency(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    m = args.latency_messages
    log(f"latency: {m} messages at {args.rate}/s, {args.rounds} rounds")
    contenders = {
        "hedwig_tasks": lambda run: latency_figures(latency_hedwig(run, m, args.rate)),
        "celery": lambda run: latency_figures(latency_celery(run, m, args.rate)),
    }
    return {name: summary(values) for name, values in rounds(workdir, args, m, contenders).items()}


#: Each ratio: (part, contender, other, figure): the contender's figure over the other's.
RATIOS = {
    "drain_vs_plain": ("drain", "hedwig_tasks", "plain_redis_py", "per_s"),
    "drain_vs_dramatiq": ("drain", "hedwig_tasks", "dramatiq", "per_s"),
    "publish_vs_dramatiq": ("publish", "hedwig_tasks", "dramatiq", "per_s"),
    "publish_vs_plain": ("publish", "hedwig_tasks", "plain_xadd", "per_s"),
    "publish_many_vs_plain_pipeline": ("publish", "hedwig_tasks_many", "plain_pipeline", "per_s"),
    "publish_many_vs_dramatiq": ("publish", "hedwig_tasks_many", "dramatiq", "per_s"),
    "latency_p99_vs_celery": ("latency", "hedwig_tasks", "celery", "p99_ms"),
}


def ratios(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each comparison's ratio of medians, and its ratio in each round (same round, same moment)."""
    out: dict[str, float] = {}
    by_round: dict[str, list[float]] = {}
    for name, (part, ours, other, figure) in RATIOS.items():
        sides = results.get(part, {})
        if ours in sides and other in sides:
            out[name] = round(sides[ours][figure] / sides[other][figure], 3)
            pairs = zip(sides[ours][f"{figure}_rounds"], sides[other][f"{figure}_rounds"], strict=True)
            by_round[name] = [round(a / b, 3) for a, b in pairs]
    return out, by_round


def targets_met(ratio: dict[str, float]) -> dict[str, bool]:
    met = {name: ratio[name[: -len("_min")]] >= bound for name, bound in TARGETS.items() if name[:-4] in ratio}
    met.update({name: ratio[name[:-4]] <= bound for name, bound in TARGETS_MAX.items() if name[:-4] in ratio})
    return met


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="drained per run (%(default)s)")
    parser.add_argument("--publish-messages", type=int, default=5000, help="published per run (%(default)s)")
    parser.add_argument("--latency-messages", type=int, default=1000, help="per latency run (%(default)s)")
    parser.add_argument("--rate", type=float, default=100.0, help="latency runs' messages per second")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, order rotated; figures are medians")
    parser.add_argument("--parts", default="drain,publish,latency")
    parser.add_argument("--url", default=URL)
    parser.add_argument("--only", help="comma-separated contenders to run (ratios only where both ran)")
    args = parser.parse_args()
    if min(args.messages, args.publish_messages // PUBLISH_CHUNK, args.latency_messages, args.rounds) < 1:
        parser.error(f"--messages, --latency-messages, --rounds must be 1 or more, --publish-messages {PUBLISH_CHUNK}+")
    return args


def main() -> int:
    args = parse_args()
    redis.Redis.from_url(args.url).ping()  # fails early if Redis is down
    parts = {"drain": drain, "publish": publish, "latency": latency}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hedwig-bench-redis-") as tmp:
        workdir = Path(tmp)
        (workdir / "schema.json").write_text(json.dumps(SCHEMA))
        for module, source in MODULES.items():
            (workdir / f"{module}.py").write_text(source)
        try:
            for part in args.parts.split(","):
                results[part] = parts[part](workdir, args)
        except BenchError as exc:
            log(f"bench failed: {exc}")
            return 1
    ratio, round_ratios = ratios(results)
    settings = {"messages": args.messages, "publish_messages": args.publish_messages, "rounds": args.rounds}
    settings.update(latency_messages=args.latency_messages, rate=args.rate, hiredis=redis.utils.HIREDIS_AVAILABLE)
    figures = {**results, "ratio": ratio, "round_ratios": round_ratios, "targets_met": targets_met(ratio)}
    print(json.dumps({"bench": "redis", **settings, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
