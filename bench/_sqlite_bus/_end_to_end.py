"""The end-to-end comparison of ``bench/sqlite_bus.py``: the bus against Celery on SQLite.

One publisher process and one worker process per run, started together on a freshly provisioned
bus; the clock runs from their start until the worker's handler has seen every message. Each
side's worker peak RSS comes from ``os.wait4`` when it exits.

* ``hedwig_tasks``: ``python -m hedwig_tasks worker -A _hedwig_app --burst -c C --prefetch P``
  on ``HEDWIG_TRANSPORT_URL=sqlite:////<tmp>/bus.db``; the publisher calls ``hedwig.publish()``
  once per message. Schema validation is on for both. The worker exits by itself (``--burst``).
* ``celery_sqla``: ``celery -A _celery_app worker -P threads -c C --prefetch-multiplier M
  --without-heartbeat --without-gossip --without-mingle -Q bench`` on
  ``sqla+sqlite:///<tmp>/celery.db``, JSON, no result backend; the publisher calls
  ``tick.delay(n)`` once per message. The worker gets SIGTERM (warm shutdown) once done.
* ``celery_sqla_wal``: the same with Celery's SQLite in WAL mode and ``synchronous=NORMAL``, as
  the hedwig-tasks bus runs, instead of the default fsync per commit.

Every run checks that each message was handled exactly once, that nothing is left on the bus
and that the dead letters are empty; a run that fails a check raises :class:`BenchError`.
``msgs/s`` is the figure compared (worker and publisher start-up included); ``steady/s`` runs
from the first to the last message handled.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The helper apps. Their own folder goes on PYTHONPATH, never bench/ itself: a bench module
#: there named after a package (bench/kombu.py) would shadow it for Celery.
APPS_DIR = Path(__file__).resolve().parent

#: Messages per run.
DEFAULT_N = 10_000
#: Runs of each side, alternating.
DEFAULT_ROUNDS = 2
#: Longest one run may take before its processes are killed, in seconds.
DEFAULT_TIMEOUT_S = 900.0
#: hedwig-tasks handler threads and messages held beyond them.
DEFAULT_CONCURRENCY = 1
DEFAULT_PREFETCH = 100
#: Celery pool, its size and ``worker_prefetch_multiplier``.
DEFAULT_CELERY_POOL = "threads"
DEFAULT_CELERY_CONCURRENCY = 4
DEFAULT_CELERY_PREFETCH_MULTIPLIER = 4
#: How long the Celery worker may take over a warm shutdown, in seconds.
CELERY_STOP_TIMEOUT_S = 30.0
#: Interval between checks for the end of a run, in seconds.
POLL_S = 0.005


class BenchError(Exception):
    """A run did not finish, or finished with messages lost, duplicated or dead-lettered."""


@dataclasses.dataclass(frozen=True)
class Side:
    """One contender: how to provision, publish and run its worker, and how to check its broker."""

    name: str
    label: str
    env: dict[str, str]
    provision: list[str]
    publisher: list[str]
    worker: list[str]
    db: str
    stop_worker: bool  #: SIGTERM the worker once done (it does not exit by itself)


@dataclasses.dataclass(frozen=True)
class Result:
    """One run of one side."""

    side: str
    n: int
    seconds: float  #: from starting both processes until the last message was handled
    steady_msgs_per_s: float  #: from the first to the last message handled
    publish_s: float  #: how long the publisher took, from its start
    exit_s: float  #: from starting both processes until the worker exited
    worker_peak_rss_mb: float
    worker_cpu_s: float  #: user plus system CPU time of the whole worker process
    publisher_cpu_s: float

    @property
    def msgs_per_s(self) -> float:
        return self.n / self.seconds


# -- the two sides --------------------------------------------------------------------------------


def hedwig_side(work: Path, *, args: argparse.Namespace, batch: int = 0) -> Side:
    db = work / "bus.db"
    app = str(APPS_DIR / "_hedwig_app.py")
    publisher = [sys.executable, app, "publish", str(args.n)] + (["--batch", str(batch)] if batch else [])
    worker = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "_hedwig_app", "--burst"]
    worker += ["-c", str(args.concurrency), "--prefetch", str(args.prefetch), "-l", "WARNING"]
    return Side(
        name="hedwig_tasks_publish_many" if batch else "hedwig_tasks",
        label=f"hedwig-tasks, publish_many({batch})" if batch else "hedwig-tasks",
        env={"HEDWIG_TRANSPORT_URL": f"sqlite:///{db}"},
        provision=[sys.executable, app, "provision"],
        publisher=publisher,
        worker=worker,
        db=str(db),
        stop_worker=False,
    )


def celery_side(work: Path, *, args: argparse.Namespace, wal: bool = False) -> Side:
    db = work / "celery.db"
    app = str(APPS_DIR / "_celery_app.py")
    worker = [sys.executable, "-m", "celery", "-A", "_celery_app", "worker", "-P", args.celery_pool]
    worker += ["-c", str(args.celery_concurrency), "--prefetch-multiplier", str(args.celery_prefetch_multiplier)]
    worker += ["--without-heartbeat", "--without-gossip", "--without-mingle", "-Q", "bench", "-l", "WARNING"]
    return Side(
        name="celery_sqla_wal" if wal else "celery_sqla",
        label="Celery sqla+sqlite, WAL" if wal else "Celery sqla+sqlite",
        env={
            "BENCH_BROKER_URL": f"sqla+sqlite:///{db}",
            "BENCH_QUEUE": "bench",
            "BENCH_PREFETCH_MULTIPLIER": str(args.celery_prefetch_multiplier),
            "BENCH_SQLITE_WAL": "1" if wal else "0",
        },
        provision=[sys.executable, app, "provision"],
        publisher=[sys.executable, app, "publish", str(args.n)],
        worker=worker,
        db=str(db),
        stop_worker=True,
    )


def check_broker(side: Side, n: int) -> None:
    """Raise :class:`BenchError` if the broker still holds work or any dead letter."""
    with sqlite3.connect(side.db) as connection:
        if side.name.startswith("hedwig"):
            (left,) = connection.execute("SELECT count(*) FROM messages").fetchone()
            (dead,) = connection.execute("SELECT count(*) FROM dead_letters").fetchone()
            problems = [f"{left} message(s) left on the bus"] if left else []
            problems += [f"{dead} dead letter(s)"] if dead else []
        else:  # Kombu keeps consumed rows, marked invisible
            (total,) = connection.execute("SELECT count(*) FROM kombu_message").fetchone()
            (left,) = connection.execute("SELECT count(*) FROM kombu_message WHERE visible = 1").fetchone()
            problems = [f"{left} message(s) not consumed"] if left else []
            problems += [f"{total} message row(s) stored, expected {n}"] if total != n else []
    connection.close()
    if problems:
        raise BenchError(f"{side.label}: " + "; ".join(problems))


# -- processes ------------------------------------------------------------------------------------


class Process:
    """A child in its own session, reaped with ``os.wait4`` so its peak RSS is known."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path, name: str) -> None:
        self.name = name
        self.stdout_path = cwd / f"{name}.out"
        self.log_path = cwd / f"{name}.log"
        with self.stdout_path.open("wb") as out, self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=log, start_new_session=True)
        self.returncode: int | None = None
        self.exited_at = 0.0
        self.peak_rss_mb = 0.0
        self.cpu_s = 0.0

    def poll(self) -> bool:
        """True once it has exited (and been reaped)."""
        if self.returncode is not None:
            return True
        pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.exited_at = time.time()
        self.returncode = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.returncode  # reaped here; Popen must not wait again
        self.peak_rss_mb = usage.ru_maxrss / 1024  # KiB on Linux
        self.cpu_s = usage.ru_utime + usage.ru_stime
        return True

    def wait(self, deadline: float) -> None:
        """Wait until it exits; :class:`BenchError` at ``deadline`` (monotonic)."""
        while not self.poll():
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} still running at the deadline")
            time.sleep(POLL_S)

    def signal(self, signum: int) -> None:
        if self.returncode is None:
            os.killpg(self.popen.pid, signum)

    def kill(self) -> None:
        """Kill its whole session if it still runs, and reap it."""
        if self.returncode is None:
            try:
                self.signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(time.monotonic() + 10.0)

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def output(self) -> dict[str, Any]:
        """The JSON object the process printed last on stdout."""
        lines = self.stdout_path.read_text().strip().splitlines()
        if not lines:
            raise BenchError(f"{self.name} printed nothing; its log ends:\n{self.log_tail()}")
        value: dict[str, Any] = json.loads(lines[-1])
        return value


def child_env(side: Side, work: Path, n: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "HEDWIG_"))}
    pythonpath = [str(APPS_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(side.env, PYTHONPATH=os.pathsep.join(pythonpath), BENCH_N=str(n), BENCH_OUT=str(work / "tally.json"))
    return env


def wait_for_done(done: Path, worker: Process, deadline: float) -> float:
    """The time the last message was handled; :class:`BenchError` if the worker stops first."""
    while not done.exists():
        if worker.poll():
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{worker.name}: not every message was handled before the timeout")
        time.sleep(POLL_S)
    if not done.exists():
        raise BenchError(
            f"{worker.name} exited ({worker.returncode}) before handling every message; log:\n{worker.log_tail()}"
        )
    done_at: float = json.loads(done.read_text())["done_at"]
    return done_at


def run(side: Side, work: Path, n: int, timeout_s: float) -> Result:
    """Provision, start the worker and the publisher together, wait until all are handled, check."""
    work.mkdir(parents=True)
    env = child_env(side, work, n)
    try:
        provisioned = subprocess.run(side.provision, env=env, cwd=work, timeout=60, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{side.label}: provisioning took over 60s") from None
    if provisioned.returncode != 0:
        raise BenchError(f"{side.label}: provisioning failed:\n{provisioned.stderr[-2000:]}")
    deadline = time.monotonic() + timeout_s
    started = time.time()
    worker = Process(side.worker, env=env, cwd=work, name=f"{side.name}-worker")
    publisher = Process(side.publisher, env=env, cwd=work, name=f"{side.name}-publisher")
    try:
        done_at = wait_for_done(work / "tally.json.done", worker, deadline)
        publisher.wait(deadline)
        if side.stop_worker:
            worker.signal(signal.SIGTERM)
            deadline = min(deadline, time.monotonic() + CELERY_STOP_TIMEOUT_S)
        worker.wait(deadline)
    finally:
        publisher.kill()
        worker.kill()
    return _checked(side, work, n, started, done_at, worker, publisher)


def _checked(
    side: Side, work: Path, n: int, started: float, done_at: float, worker: Process, publisher: Process
) -> Result:
    for process in (worker, publisher):
        if process.returncode != 0:
            raise BenchError(f"{process.name} exited {process.returncode}; log:\n{process.log_tail()}")
    tally = json.loads((work / "tally.json").read_text())
    if (tally["handled"], tally["distinct"], tally["duplicates"]) != (n, n, 0):
        raise BenchError(f"{side.label}: expected {n} handled once each, got {tally}")
    check_broker(side, n)
    published = publisher.output()
    return Result(
        side=side.name,
        n=n,
        seconds=done_at - started,
        steady_msgs_per_s=(n - 1) / max(done_at - tally["first_at"], 1e-9),
        publish_s=published["publish_done_at"] - started,
        exit_s=worker.exited_at - started,
        worker_peak_rss_mb=worker.peak_rss_mb,
        worker_cpu_s=worker.cpu_s,
        publisher_cpu_s=publisher.cpu_s,
    )


# -- reporting ------------------------------------------------------------------------------------


def summary(results: list[Result]) -> dict[str, Any]:
    best = max(results, key=lambda r: r.msgs_per_s)
    return {
        "msgs_per_s": round(best.msgs_per_s, 1),
        "msgs_per_s_median": round(statistics.median(r.msgs_per_s for r in results), 1),
        "seconds": round(best.seconds, 3),
        "steady_msgs_per_s": round(best.steady_msgs_per_s, 1),
        "publish_s": round(best.publish_s, 3),
        "worker_peak_rss_mb": round(max(r.worker_peak_rss_mb for r in results), 1),
        "worker_cpu_us_per_msg": round(statistics.median(r.worker_cpu_s for r in results) / best.n * 1e6, 1),
        "publisher_cpu_us_per_msg": round(statistics.median(r.publisher_cpu_s for r in results) / best.n * 1e6, 1),
        "rounds_msgs_per_s": [round(r.msgs_per_s, 1) for r in results],
    }


def print_table(sides: list[Side], by_side: dict[str, list[Result]]) -> None:
    header = f"{'side':34} {'round':>5} {'msgs/s':>9} {'seconds':>8} {'steady/s':>9} {'publish s':>9} "
    header += f"{'exit s':>7} {'peak RSS MB':>11} {'worker CPU us/msg':>17} {'publisher CPU us/msg':>20}"
    print(header, file=sys.stderr)
    for side in sides:
        for index, r in enumerate(by_side[side.name], 1):
            print(
                f"{side.label:34} {index:>5} {r.msgs_per_s:>9.1f} {r.seconds:>8.3f} {r.steady_msgs_per_s:>9.1f} "
                f"{r.publish_s:>9.3f} {r.exit_s:>7.3f} {r.worker_peak_rss_mb:>11.1f} "
                f"{r.worker_cpu_s / r.n * 1e6:>17.1f} {r.publisher_cpu_s / r.n * 1e6:>20.1f}",
                file=sys.stderr,
            )


def report(args: argparse.Namespace, sides: list[Side], by_side: dict[str, list[Result]]) -> dict[str, Any]:
    print_table(sides, by_side)
    out: dict[str, Any] = {
        "n": args.n,
        "settings": {
            "hedwig_tasks": f"-c {args.concurrency} --prefetch {args.prefetch} --burst",
            "celery_sqla": f"-P {args.celery_pool} -c {args.celery_concurrency} "
            f"--prefetch-multiplier {args.celery_prefetch_multiplier}",
        },
    }
    for side in sides:
        out[side.name] = summary(by_side[side.name])
    hedwig = out["hedwig_tasks"]
    for celery in ("celery_sqla", "celery_sqla_wal"):
        out[f"ratio_{celery}"] = {
            "throughput": round(hedwig["msgs_per_s_median"] / out[celery]["msgs_per_s_median"], 2),
            "memory": round(hedwig["worker_peak_rss_mb"] / out[celery]["worker_peak_rss_mb"], 2),
        }
    return out


# -- the comparison ------------------------------------------------------------------------------


def side_makers(args: argparse.Namespace) -> list[Callable[[Path], Side]]:
    """One maker per side to run; each builds the side for a run's own directory."""
    makers: list[Callable[[Path], Side]] = [functools.partial(hedwig_side, args=args)]
    if args.publish_many:
        makers.append(functools.partial(hedwig_side, args=args, batch=args.publish_many))
    makers.append(functools.partial(celery_side, args=args))
    makers.append(functools.partial(celery_side, args=args, wal=True))
    return makers


def run_all(args: argparse.Namespace, root: Path) -> tuple[list[Side], dict[str, list[Result]]]:
    makers = side_makers(args)
    sides = [make(root) for make in makers]  # for names and labels
    by_side: dict[str, list[Result]] = {side.name: [] for side in sides}
    order = list(zip(makers, sides, strict=True))
    for round_index in range(args.rounds):
        # Rotate which side goes first, so none always runs on a warmer machine.
        shift = round_index % len(order)
        for make, side in order[shift:] + order[:shift]:
            print(f"round {round_index + 1}/{args.rounds}: {side.label} ...", file=sys.stderr, flush=True)
            work = root / f"{side.name}-{round_index}"
            result = run(make(work), work, args.n, args.timeout)
            by_side[side.name].append(result)
            print(f"  {result.msgs_per_s:.1f} msgs/s in {result.seconds:.2f}s", file=sys.stderr, flush=True)
    return sides, by_side


def versus_celery(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run every side ``args.rounds`` times; the figures of each and hedwig-tasks' ratios."""
    sides, by_side = run_all(args, root)
    return report(args, sides, by_side)
