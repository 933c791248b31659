"""End-to-end throughput through Kombu: hedwig-tasks against Celery, on RabbitMQ.

(Redis has its own transport on Redis Streams and its own bench, ``bench/redis.py``; the
RabbitMQ hot path against a plain pika loop and Dramatiq is ``bench/rabbitmq.py``.)

In the same run: start a worker process (hedwig-tasks worker, or a Celery
worker with the thread pool), wait until it handles a warm-up message, then publish
``--messages`` messages from ``--publishers`` threads of this process (as a web app's request
threads would) and time until the last one is handled. Both sides use the same concurrency,
ack after the handler (Celery: ``task_acks_late``), and the same handler: append one byte to a
file. hedwig-tasks validates every message against its JSON schema on publish and on receive,
and waits for RabbitMQ's publisher confirm on every publish; Celery does neither.

Usage::

    python bench/kombu.py [--messages 5000] [--rounds 3] [--concurrency 8] [--publishers 4]

Progress goes to stderr; stdout gets ONE JSON line:
``{"bench": "kombu", "messages": N, ..., "comparisons": [{"name": "rabbitmq", "hedwig_per_s": ..,
"celery_per_s": .., "ratio": .., "round_ratios": [..]}]}``: rates are medians over
``--rounds`` alternating rounds and ``ratio`` is hedwig-tasks's over Celery's.
The broker comes from ``HEDWIG_TEST_AMQP_URL`` or the local default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

# This file is named like the library it measures: never let ``import kombu`` find it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import kombu  # noqa: E402

from hedwig_tasks import Hedwig  # noqa: E402
from hedwig_tasks.transports.kombu import KombuTransport  # noqa: E402

URL = os.environ.get("HEDWIG_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

SCHEMA = {
    "id": "https://hedwig-tasks.bench/schema",
    "$schema": "http://json-schema.org/draft-04/schema",
    "schemas": {
        "user-created": {
            "1.*": {
                "type": "object",
                "x-version": "1.0",
                "required": ["user_id", "email"],
                "properties": {"user_id": {"type": "string"}, "email": {"type": "string", "minLength": 3}},
            }
        }
    },
}

HEDWIG_APP = """
import os
from hedwig_tasks import Hedwig

hedwig = Hedwig(os.environ["BENCH_APP"], schema=os.environ["BENCH_SCHEMA"],
                routing={"user-created": os.environ["BENCH_TOPIC"]})
DONE = os.open(os.environ["BENCH_DONE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

@hedwig.handler("user-created", "1.*")
def user_created(message):
    os.write(DONE, b".")
"""

CELERY_APP = """
import os
from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_URL"])
app.conf.update(task_ignore_result=True, task_acks_late=True, worker_prefetch_multiplier=4,
                task_default_queue=os.environ["BENCH_APP"], broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False)
DONE = os.open(os.environ["BENCH_DONE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

@app.task(name="bench.user_created")
def user_created(user_id, email):
    os.write(DONE, b".")
"""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Run:
    """One side on one broker: its files, its worker process, and how many were handled."""

    def __init__(self, workdir: Path, url: str, side: str) -> None:
        self.tag = f"bench-{side}-{uuid.uuid4().hex[:8]}"
        self.url = url
        self.done = workdir / f"{self.tag}.done"
        self.done.touch()
        self.env = {
            **os.environ,
            "BENCH_APP": self.tag,
            "BENCH_TOPIC": self.tag,
            "BENCH_URL": url,
            "BENCH_SCHEMA": str(workdir / "schema.json"),
            "BENCH_DONE": str(self.done),
            "HEDWIG_TRANSPORT_URL": url,
            "PYTHONPATH": os.pathsep.join([str(workdir), *sys.path[1:]]),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def handled(self) -> int:
        return self.done.stat().st_size

    def start(self, command: list[str]) -> None:
        self.process = subprocess.Popen(command, env=self.env, cwd=self.done.parent, stdout=subprocess.DEVNULL)

    def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.handled() < count:
            if self.process is not None and self.process.poll() is not None:
                raise SystemExit(f"{self.tag}: the worker exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.tag}: {self.handled()} of {count} handled in {timeout_s:.0f}s")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def bench_hedwig(workdir: Path, url: str, messages: int, concurrency: int, publishers: int) -> float:
    run = Run(workdir, url, "hedwig")
    app = Hedwig(run.tag, schema=workdir / "schema.json", transport=url, routing={"user-created": run.tag})
    app.handler("user-created", "1.*")(lambda message: None)
    app.provision()
    prefetch = str(concurrency * 4)
    command = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "hedwig_bench_app", "-l", "WARNING"]
    run.start([*command, "-c", str(concurrency), "--prefetch", prefetch])
    try:
        app.publish("user-created", "1.0", {"user_id": "warm-up", "email": "w@example.com"})
        run.wait_for(1, 60)
        started = time.perf_counter()
        in_threads(publishers, messages, lambda n: app.publish("user-created", "1.0", _data(n)))
        log(f"  published in {time.perf_counter() - started:.2f}s, {run.handled() - 1} handled by then")
        run.wait_for(messages + 1, 600)
        return messages / (time.perf_counter() - started)
    finally:
        run.stop()
        app.transport.close()
        _cleanup(url, [f"hedwig-{run.tag}-{run.tag}", f"hedwig-{run.tag}-dlq"], [f"hedwig-{run.tag}"])


def bench_celery(workdir: Path, url: str, messages: int, concurrency: int, publishers: int) -> float:
    from celery import Celery

    run = Run(workdir, url, "celery")
    app = Celery("bench", broker=url)
    app.conf.update(task_ignore_result=True, task_default_queue=run.tag, broker_connection_retry_on_startup=True)
    task = app.signature("bench.user_created")
    command = [sys.executable, "-m", "celery", "-A", "celery_bench_app", "worker", "-P", "threads", "-l", "WARNING"]
    command += ["-c", str(concurrency), "--without-gossip", "--without-mingle", "--without-heartbeat"]
    run.start(command)
    try:
        task.apply_async(kwargs={"user_id": "warm-up", "email": "w@example.com"})
        run.wait_for(1, 60)
        started = time.perf_counter()
        in_threads(publishers, messages, lambda n: task.apply_async(kwargs=_data(n)))
        log(f"  published in {time.perf_counter() - started:.2f}s, {run.handled() - 1} handled by then")
        run.wait_for(messages + 1, 600)
        return messages / (time.perf_counter() - started)
    finally:
        run.stop()
        app.close()
        _cleanup(url, [run.tag], [run.tag])


def _data(n: int) -> dict[str, str]:
    return {"user_id": f"U{n}", "email": "u@example.com"}


def in_threads(threads: int, count: int, publish: Callable[[int], object]) -> None:
    """Call ``publish(n)`` for n in range(count), spread over ``threads`` threads (a web app's requests)."""

    def share(start: int) -> None:
        for n in range(start, count, threads):
            publish(n)

    workers = [threading.Thread(target=share, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _cleanup(url: str, queues: list[str], exchanges: list[str]) -> None:
    with kombu.Connection(url) as connection:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in exchanges:
            try:
                channel.exchange_delete(exchange)
            except Exception:
                channel = connection.channel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; rates are their medians")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--publishers", type=int, default=4, help="threads publishing, on both sides")
    args = parser.parse_args()
    comparisons = []
    with tempfile.TemporaryDirectory(prefix="hedwig-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "schema.json").write_text(json.dumps(SCHEMA))
        (workdir / "hedwig_bench_app.py").write_text(HEDWIG_APP)
        (workdir / "celery_bench_app.py").write_text(CELERY_APP)
        comparisons.append(compare(workdir, args))
    run = {"messages": args.messages, "rounds": args.rounds, "concurrency": args.concurrency}
    print(json.dumps({"bench": "kombu", **run, "publishers": args.publishers, "comparisons": comparisons}))


def compare(workdir: Path, args: argparse.Namespace) -> dict[str, object]:
    """Alternating rounds of both sides on RabbitMQ, so a busy moment of the machine hits both."""
    url, name = URL, "rabbitmq"
    KombuTransport(url).status("bench", [])  # fails early if the broker is down
    hedwig: list[float] = []
    celery: list[float] = []
    for round_ in range(1, args.rounds + 1):
        log(f"{name} round {round_}: hedwig-tasks, {args.messages} messages ...")
        hedwig.append(bench_hedwig(workdir, url, args.messages, args.concurrency, args.publishers))
        log(f"{name} round {round_}: hedwig-tasks {hedwig[-1]:.0f}/s; Celery ...")
        celery.append(bench_celery(workdir, url, args.messages, args.concurrency, args.publishers))
        log(f"{name} round {round_}: Celery {celery[-1]:.0f}/s; ratio {hedwig[-1] / celery[-1]:.2f}")
    return {
        "name": name,
        "hedwig_per_s": round(statistics.median(hedwig), 1),
        "celery_per_s": round(statistics.median(celery), 1),
        "ratio": round(statistics.median(hedwig) / statistics.median(celery), 3),
        "round_ratios": [round(h / c, 3) for h, c in zip(hedwig, celery, strict=True)],
    }


if __name__ == "__main__":
    main()
