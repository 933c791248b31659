"""The process pool against the thread pool and Celery's prefork pool.

Two questions, each contender in a fresh process per round, rounds rotating who goes first:

* **CPU-bound throughput.** A pure-Python handler that burns ``--work-ms`` (about 5 ms,
  calibrated on this machine) per message; messages per second over ``--n`` messages, from the
  first handler start to the last handler end (so start-up is left out for everyone), each run
  writing one line per message to a results file:

  - ``threads_cpu``: ``hedwig-tasks worker --pool threads -c C`` on the SQLite bus;
  - ``processes_cpu``: ``--pool processes -c C`` on the same bus;
  - ``celery_prefork_cpu``: ``celery worker -P prefork -c C`` on Redis (db 9, a queue of its
    own), ``task_acks_late`` (acknowledged after the task, as our worker does),
    ``worker_prefetch_multiplier=4`` (eight held at ``-c 2``, as our ``--prefetch 8``),
    without gossip, mingle and heartbeats. Redis is Celery's best broker; its SQLAlchemy
    broker on a SQLite file (the closest to our bus) polls once a second and would measure
    its polling, not its pool, so Redis is the fairer, and harder, comparison.

* **Overhead on a no-op handler.** Microseconds of CPU per message on the SQLite bus, counting
  the worker process and, for the process pool, its children (``/proc/<pid>/stat``), from the
  worker's ``worker_ready`` to its ``worker_shutting_down`` (children's start-up left out):
  ``threads_noop`` and ``processes_noop``, ``--burst``, ``-c C``.

Usage::

    python bench/pool.py [--n 400] [--noop-n 3000] [--rounds 3] [-c 2] [--work-ms 5]

A table goes to stderr; the last line on stdout is ONE JSON object with medians, spreads
(min..max) and ``ratio``: ``processes_over_threads_cpu`` (throughput, the issue asks >= 1.8 at
``-c 2``), ``processes_over_celery_cpu`` (throughput, asks >= 1.0) and
``noop_cpu_processes_over_threads`` (CPU per message, asks <= 2.0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # bench/kombu.py is not kombu

REDIS_URL = os.environ.get("HEDWIG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")

#: The handler's work and the apps, written to a temporary directory that children import from.
APPS = """
import os, time
from hedwig_tasks import Hedwig

LOOPS = int(os.environ["BENCH_LOOPS"])
RESULTS = os.environ["BENCH_RESULTS"]
NOOP = os.environ.get("BENCH_NOOP") == "1"


def burn():
    total = 0
    for i in range(LOOPS):
        total += i * i
    return total


def record(started):
    fd = os.open(RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"%f %f\\n" % (started, time.time()))
    os.close(fd)


SCHEMA = {
    "id": "https://hedwig-tasks.bench/pool",
    "$schema": "http://json-schema.org/draft-04/schema",
    "schemas": {"job": {"1.*": {"type": "object", "x-version": "1.0", "required": ["n"],
                                "properties": {"n": {"type": "integer"}}}}},
}

app = Hedwig("pool-bench", schema=SCHEMA, transport=os.environ["BENCH_URL"], routing={"job": "jobs"})


@app.handler("job", "1.*")
def job(message):
    if NOOP:
        return
    started = time.time()
    burn()
    record(started)
"""

CELERY_APP = """
import os, time
from celery import Celery
from bench_apps import burn, record

app = Celery("pool-bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(task_default_queue=os.environ["BENCH_QUEUE"], task_acks_late=True,
                worker_prefetch_multiplier=4, worker_hijack_root_logger=False)


@app.task(name="job")
def job(n):
    started = time.time()
    burn()
    record(started)
"""


def _calibrate(work_ms: float) -> int:
    """Loops of the handler's work that take about ``work_ms`` of CPU here (timed in this process's
    CPU time, the fastest of five: time other processes take on a busy machine is not counted)."""
    loops, elapsed = 10_000, 0.0
    while elapsed < 0.05:
        loops *= 2
        elapsed = _time_loops(loops)
    elapsed = min(_time_loops(loops) for _ in range(5))
    return int(loops * work_ms / 1000 / elapsed)


def _time_loops(loops: int) -> float:
    started = time.process_time()
    total = 0
    for i in range(loops):
        total += i * i
    return time.process_time() - started


def _env(workdir: Path, loops: int, url: str, *, noop: bool = False) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")]),
        "BENCH_LOOPS": str(loops),
        "BENCH_RESULTS": str(workdir / "results.txt"),
        "BENCH_URL": url,
        "BENCH_NOOP": "1" if noop else "0",
        "BENCH_REDIS_URL": REDIS_URL,
    }


def _workdir() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="hedwig-pool-"))
    (workdir / "bench_apps.py").write_text(textwrap.dedent(APPS))
    (workdir / "celery_bench.py").write_text(textwrap.dedent(CELERY_APP))
    return workdir


def _throughput(results: Path, n: int) -> float:
    rows = [tuple(map(float, line.split())) for line in results.read_text().splitlines()]
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} of {n} messages handled")
    return n / (max(end for _, end in rows) - min(start for start, _ in rows))


def _wait_for(results: Path, n: int, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not results.exists() or len(results.read_text().splitlines()) < n:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker stopped or timed out (exit {process.poll()})")
        time.sleep(0.05)


# -- contenders ---------------------------------------------------------------------------------


def hedwig_cpu(pool: str, n: int, concurrency: int, loops: int) -> float:
    """Messages per second of ``hedwig-tasks worker --pool POOL`` on the SQLite bus."""
    workdir = _workdir()
    env = _env(workdir, loops, f"sqlite:///{workdir}/bus.db")
    _fill(env, n, workdir)
    command = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "bench_apps", "--pool", pool]
    command += ["-c", str(concurrency), "--burst", "-l", "WARNING"]
    process = subprocess.Popen(command, env=env, cwd=workdir)
    _wait_for(workdir / "results.txt", n, process)
    if process.wait(60) != 0:
        raise SystemExit(f"hedwig-tasks worker exited {process.returncode}")
    return _throughput(workdir / "results.txt", n)


def _fill(env: dict[str, str], n: int, workdir: Path) -> None:
    script = (
        "import bench_apps as b\n"
        "from hedwig_tasks.validators.base import to_transport\n"
        "b.app.provision()\n"
        f"rows = [to_transport(b.app.validator.encode(b.app.message('job', '1.0', {{'n': i}})), text_only=False)"
        f" for i in range({n})]\n"
        "b.app.transport.publish_many('jobs', rows)\n"
        "b.app.close()\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=workdir)


def celery_cpu(n: int, concurrency: int, loops: int) -> float:
    """Messages per second of ``celery worker -P prefork`` on Redis."""
    workdir = _workdir()
    queue = f"pool-bench-{uuid.uuid4().hex[:8]}"
    env = {**_env(workdir, loops, "memory://"), "BENCH_QUEUE": queue}
    script = f"import celery_bench as c\nfor i in range({n}): c.job.delay(i)\n"
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=workdir)
    command = [sys.executable, "-m", "celery", "-A", "celery_bench", "worker", "-P", "prefork"]
    command += ["-c", str(concurrency), "-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat"]
    command += ["-l", "WARNING"]
    process = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.DEVNULL)
    try:
        _wait_for(workdir / "results.txt", n, process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue, f"_kombu.binding.{queue}")
    return _throughput(workdir / "results.txt", n)


def hedwig_noop(pool: str, n: int, concurrency: int) -> float:
    """Microseconds of CPU per message (worker and children) with a no-op handler, in this process."""
    workdir = _workdir()
    os.environ.update(_env(workdir, 0, f"sqlite:///{workdir}/bus.db", noop=True))
    sys.path.insert(0, str(workdir))
    _fill(dict(os.environ), n, workdir)
    import bench_apps

    from hedwig_tasks import signals
    from hedwig_tasks.worker import Worker, WorkerOptions

    options = WorkerOptions(burst=True, concurrency=concurrency, pool=pool, app_spec="bench_apps:app", wait_s=0.05)
    worker = Worker(bench_apps.app, options)
    marks: list[tuple[float, float]] = []

    def mark(sender: object, **_: object) -> None:
        marks.append((_cpu_s(), sum(_child_cpu_s(pid) for pid in _children(worker))))

    signals.worker_ready.connect(mark, sender=bench_apps.app, weak=False)
    signals.worker_shutting_down.connect(mark, sender=bench_apps.app, weak=False)
    worker.run()
    if worker.counts["handled"] != n:
        raise SystemExit(f"handled {worker.counts['handled']} of {n}")
    (parent_0, children_0), (parent_1, children_1) = marks
    parent_us, children_us = (parent_1 - parent_0) / n * 1e6, (children_1 - children_0) / n * 1e6
    print(json.dumps({"parent_us": round(parent_us, 1), "children_us": round(children_us, 1)}))
    return parent_us + children_us


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children(worker: object) -> list[int]:
    pool = getattr(worker, "_pool", None)  # the bench peeks: the worker does not publish its children
    return [child.pid for child in getattr(pool, "_all", ())]


def _child_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the parent ---------------------------------------------------------------------------------


def run_child(name: str, args: argparse.Namespace, loops: int) -> float:
    command = [sys.executable, __file__, "--child", name, "--n", str(args.n), "--noop-n", str(args.noop_n)]
    command += ["-c", str(args.concurrency), "--loops", str(loops)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    lines = out.stdout.strip().splitlines()
    if name.endswith("noop"):  # the worker's and its children's shares, on the line before
        SPLITS.setdefault(name, []).append(json.loads(lines[-2]))
    return float(lines[-1])


#: Per no-op contender, each round's CPU per message in the worker process and in its children.
SPLITS: dict[str, list[dict[str, float]]] = {}
#: The machine's one-minute load average as each run began (2 cores: above 2, others wait too).
LOADS: list[float] = []


CHILDREN = {
    "threads_cpu": lambda a: hedwig_cpu("threads", a.n, a.concurrency, a.loops),
    "processes_cpu": lambda a: hedwig_cpu("processes", a.n, a.concurrency, a.loops),
    "celery_prefork_cpu": lambda a: celery_cpu(a.n, a.concurrency, a.loops),
    "threads_noop": lambda a: hedwig_noop("threads", a.noop_n, a.concurrency),
    "processes_noop": lambda a: hedwig_noop("processes", a.noop_n, a.concurrency),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--noop-n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-c", "--concurrency", type=int, default=2)
    parser.add_argument("--work-ms", type=float, default=5.0)
    parser.add_argument("--only", default=",".join(CHILDREN), help="contenders, comma-separated")
    parser.add_argument("--loops", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        print(CHILDREN[args.child](args))
        return
    loops = _calibrate(args.work_ms)
    names = args.only.split(",")
    runs: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            LOADS.append(os.getloadavg()[0])
            runs[name].append(run_child(name, args, loops))
            unit = "us/message" if name.endswith("noop") else "messages/s"
            print(f"round {round_ + 1}: {name:20} {runs[name][-1]:9.1f} {unit}", file=sys.stderr)
            if name in SPLITS:
                split = SPLITS[name][-1]
                print(f"{'':30} worker {split['parent_us']:.1f} + children {split['children_us']:.1f}", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in runs.items()}
    for name, values in runs.items():
        print(f"{name:20} median {median[name]:9.1f}  ({min(values):.1f}..{max(values):.1f})", file=sys.stderr)
    print(json.dumps(_summary(args, loops, runs, median)))


def _summary(
    args: argparse.Namespace, loops: int, runs: dict[str, list[float]], median: dict[str, float]
) -> dict[str, object]:
    def ratio(a: str, b: str) -> float | None:
        return round(median[a] / median[b], 2) if a in median and b in median else None

    return {
        "bench": "pool",
        "n": args.n,
        "noop_n": args.noop_n,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "work_ms": args.work_ms,
        "loops": loops,
        "loadavg_1m": [round(min(LOADS), 2), round(max(LOADS), 2)],
        "messages_per_s": {k: round(v, 1) for k, v in median.items() if k.endswith("_cpu")},
        "us_per_message": {k: round(v, 1) for k, v in median.items() if k.endswith("_noop")},
        "spread": {k: [round(min(v), 1), round(max(v), 1)] for k, v in runs.items()},
        "us_per_message_split": {
            k: {part: round(statistics.median(s[part] for s in v), 1) for part in ("parent_us", "children_us")}
            for k, v in SPLITS.items()
        },
        "ratio": {
            "processes_over_threads_cpu": ratio("processes_cpu", "threads_cpu"),
            "processes_over_celery_cpu": ratio("processes_cpu", "celery_prefork_cpu"),
            "noop_cpu_processes_over_threads": ratio("processes_noop", "threads_noop"),
        },
        "targets": {
            "processes_over_threads_cpu": ">= 1.8",
            "processes_over_celery_cpu": ">= 1.0",
            "noop_cpu_processes_over_threads": "<= 2.0",
        },
    }


if __name__ == "__main__":
    main()
