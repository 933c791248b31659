"""The embedded SQLite bus: drain against a plain sqlite3 loop, two workers against one, latency.

Every comparison runs in this one process's rounds, with the order of contenders rotated each
round; each figure is the median over rounds, with its spread (lowest and highest).

* ``drain``: ``--n`` messages are encoded and validated by ``_hedwig_app.py load`` and stored
  in one transaction once every consumer is ready; the clock runs from that commit to the last
  message handled. Contenders:

  * ``hedwig_1``: one worker, ``python -m hedwig_tasks worker -A _hedwig_app -c C --prefetch P``
    (no ``--burst``: it is stopped with SIGTERM once the bus is empty). Validation on.
  * ``hedwig_2``: two such worker processes on the same bus.
  * ``plain_sqlite3``: ``_plain_loop.py``, the same claim and delete work on the same file with
    nothing but :mod:`sqlite3` (WAL, ``synchronous=NORMAL`` as the bus; a batch of C + P rows
    claimed per ``UPDATE ... RETURNING`` transaction, each body decoded, each message deleted,
    one transaction per batch).

  The worker CPU per message is the CPU time of the worker processes over the drain (from
  ``/proc``, start-up excluded); ``cores`` is that CPU time over the drain's wall time, which
  shows when two workers did not get two cores (the machine was busy with other work).
* ``latency``: one worker as above, idle for ``--idle-s`` seconds (its CPU share measured from
  ``/proc/<pid>/stat``), then ``_hedwig_app.py publish --rate R`` publishes ``--latency-n``
  messages at R a second, each stamped with the time its ``publish()`` call started; the worker's
  handler records the delay to its own start. p50 and p99 over all rounds' messages.
* ``celery`` (``--celery``, off by default: Celery takes minutes per run): the end-to-end runs
  of ``_sqlite_bus/_end_to_end.py`` against Celery on Kombu's SQLAlchemy transport over SQLite,
  by default and in WAL mode, with ``--celery-n`` messages.

Every run checks that each message was handled exactly once and nothing is left on the bus.

Usage::

    python bench/sqlite_bus.py [--n 20000] [--rounds 5] [-c 4] [--prefetch 12]
                               [--rate 100] [--latency-n 500] [--idle-s 5] [--celery]

A table goes to stderr; the last line on stdout is one JSON object whose ``ratio`` holds
``drain_vs_plain_sqlite3``, ``two_workers_vs_one``, ``drain_cpu_vs_plain_sqlite3`` (the loop's CPU
per message over the worker's) and, with ``--celery``, the throughput against each Celery
variant, whose ``latency`` holds p50/p99 in ms and the idle CPU share, and whose ``load_avg`` is the
machine's load average before and after (on two cores, a load near 2 means other work shared them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

APPS_DIR = Path(__file__).resolve().parent / "_sqlite_bus"
sys.path.insert(0, str(APPS_DIR))

from _end_to_end import BenchError, Process, versus_celery  # noqa: E402

#: Messages per drain run.
DEFAULT_N = 20_000
#: Rounds of every comparison.
DEFAULT_ROUNDS = 5
#: The worker's handler threads and messages held beyond them (16 held in all).
DEFAULT_CONCURRENCY = 4
DEFAULT_PREFETCH = 12
#: Messages a second, and how many, in the latency run.
DEFAULT_RATE = 100.0
DEFAULT_LATENCY_N = 500
#: How long the idle worker's CPU is measured, in seconds.
DEFAULT_IDLE_S = 5.0
#: Messages per Celery end-to-end run (Celery drains about 100 a second).
DEFAULT_CELERY_N = 2_000
#: Longest one run may take, in seconds.
TIMEOUT_S = 300.0
#: Interval between checks for the end of a run, in seconds.
POLL_S = 0.01
#: Clock ticks a second in /proc/<pid>/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User plus system CPU time of a running process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Bus:
    """A fresh, provisioned bus in its own directory, and the processes running on it."""

    def __init__(self, work: Path, n: int) -> None:
        work.mkdir(parents=True)
        self.work = work
        self.file = work / "bus.db"
        self.n = n
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "HEDWIG_"))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(APPS_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]),
            HEDWIG_TRANSPORT_URL=f"sqlite:///{self.file}",
            BENCH_N=str(n),
        )
        self.env = env
        self.app = str(APPS_DIR / "_hedwig_app.py")
        subprocess.run([sys.executable, self.app, "provision"], env=env, cwd=work, check=True, timeout=60)
        self.processes: list[Process] = []

    def ready_file(self, name: str) -> Path:
        return self.work / f"{name}.ready"

    def start(self, name: str, argv: list[str]) -> Process:
        """Start a consumer that touches its ready file and writes its tally to ``<name>.json``."""
        env = dict(self.env, BENCH_OUT=str(self.work / f"{name}.json"), BENCH_READY=str(self.ready_file(name)))
        process = Process(argv, env=env, cwd=self.work, name=name)
        self.processes.append(process)
        return process

    def worker(self, name: str, args: argparse.Namespace) -> Process:
        argv = [sys.executable, "-m", "hedwig_tasks", "worker", "-A", "_hedwig_app", "-l", "WARNING"]
        return self.start(name, [*argv, "-c", str(args.concurrency), "--prefetch", str(args.prefetch)])

    def wait_ready(self, ready: list[Path], deadline: float) -> None:
        while not all(path.exists() for path in ready):
            self._check_running(deadline)
            time.sleep(POLL_S)

    def wait_empty(self, deadline: float) -> None:
        """Until the bus holds no message (every one handled and acknowledged)."""
        with sqlite3.connect(self.file) as connection:
            while connection.execute("SELECT 1 FROM messages LIMIT 1").fetchone():
                self._check_running(deadline)
                time.sleep(POLL_S)
        connection.close()

    def _check_running(self, deadline: float) -> None:
        for process in self.processes:
            if process.poll():
                raise BenchError(f"{process.name} exited {process.returncode}; log:\n{process.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"run in {self.work} did not finish in time")

    def stop(self, deadline: float) -> None:
        for process in self.processes:
            process.signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(deadline)
            if process.returncode != 0:
                raise BenchError(f"{process.name} exited {process.returncode}; log:\n{process.log_tail()}")

    def kill(self) -> None:
        for process in self.processes:
            process.kill()

    def tallies(self, names: list[str]) -> list[dict[str, Any]]:
        """Each consumer's tally; :class:`BenchError` unless together they saw each message once."""
        tallies = [json.loads((self.work / f"{name}.json").read_text()) for name in names]
        seen = sorted(n for tally in tallies for n in tally["seen"])
        handled = sum(tally["handled"] for tally in tallies)
        if seen != list(range(self.n)) or handled != self.n:
            raise BenchError(f"{names}: expected {self.n} handled once each, got {handled} handled")
        return tallies


# -- the drain ------------------------------------------------------------------------------------


def drain(contender: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """One drain run: msgs/s from the load's commit to the last handled, and consumer CPU per message."""
    bus = Bus(work, args.n)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        if contender == "plain_sqlite3":
            script = [sys.executable, str(APPS_DIR / "_plain_loop.py"), str(bus.file)]
            script += ["--batch", str(args.concurrency + args.prefetch), "--ready", str(bus.ready_file("plain"))]
            return _timed_drain(bus, [bus.start("plain", script)], deadline, stop=False)
        count = 2 if contender == "hedwig_2" else 1
        return _timed_drain(bus, [bus.worker(f"worker{i}", args) for i in range(count)], deadline, stop=True)
    finally:
        bus.kill()


def _timed_drain(bus: Bus, consumers: list[Process], deadline: float, *, stop: bool) -> dict[str, float]:
    """Load once every consumer is ready; wait until the bus is empty; read the tallies."""
    go = bus.work / "go"
    argv = [sys.executable, bus.app, "load", str(bus.n), "--go", str(go)]
    loader = Process(argv, env=bus.env, cwd=bus.work, name="loader")
    bus.wait_ready([bus.ready_file(p.name) for p in consumers], deadline)
    before = sum(cpu_s(p.popen.pid) for p in consumers) if stop else 0.0
    go.touch()
    loader.wait(deadline)
    bus.wait_empty(deadline)
    if stop:  # workers run until told; CPU read before SIGTERM, so shutdown is not counted
        used = sum(cpu_s(p.popen.pid) for p in consumers) - before
        bus.stop(deadline)
    else:  # the plain loop exits by itself, saying how much CPU its drain took
        for process in consumers:
            process.wait(deadline)
        used = sum(p.output()["cpu_s"] for p in consumers)
    tallies = bus.tallies([p.name for p in consumers])
    seconds = max(t["last_at"] for t in tallies) - loader.output()["loaded_at"]
    # cores: how much CPU the consumers got over the drain (two workers on two free cores: near 2)
    return {"msgs_per_s": bus.n / seconds, "cpu_us_per_msg": used / bus.n * 1e6, "cores": used / seconds}


# -- latency --------------------------------------------------------------------------------------


def latency(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Idle CPU share of a ready worker, then the delay from publish() to handler start at a rate."""
    bus = Bus(work, args.latency_n)
    deadline = time.monotonic() + TIMEOUT_S + args.idle_s
    try:
        worker = bus.worker("worker0", args)
        bus.wait_ready([bus.ready_file(worker.name)], deadline)
        time.sleep(1.0)  # let start-up settle (a measurement interval, not a synchronisation)
        before, started = cpu_s(worker.popen.pid), time.monotonic()
        time.sleep(args.idle_s)
        idle_pct = (cpu_s(worker.popen.pid) - before) / (time.monotonic() - started) * 100
        argv = [sys.executable, bus.app, "publish", str(args.latency_n), "--rate", str(args.rate)]
        publisher = Process(argv, env=bus.env, cwd=bus.work, name="publisher")
        publisher.wait(deadline)
        if publisher.returncode != 0:
            raise BenchError(f"publisher exited {publisher.returncode}; log:\n{publisher.log_tail()}")
        bus.wait_empty(deadline)
        bus.stop(deadline)
        (tally,) = bus.tallies([worker.name])
    finally:
        bus.kill()
    return {"idle_cpu_pct": idle_pct, "latencies_s": tally["latencies_s"]}


# -- rounds and the report ------------------------------------------------------------------------

DRAIN_CONTENDERS = ["hedwig_1", "hedwig_2", "plain_sqlite3"]


def spread(values: list[float], digits: int = 1) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "rounds": [round(v, digits) for v in values],
    }


def run_rounds(args: argparse.Namespace, root: Path) -> tuple[dict[str, list[dict[str, float]]], list[dict[str, Any]]]:
    drains: dict[str, list[dict[str, float]]] = {name: [] for name in DRAIN_CONTENDERS}
    latencies: list[dict[str, Any]] = []
    runs: list[tuple[str, Callable[[Path], None]]] = [
        *[(name, lambda work, name=name: drains[name].append(drain(name, work, args))) for name in DRAIN_CONTENDERS],
        ("latency", lambda work: latencies.append(latency(work, args))),
    ]
    for round_index in range(args.rounds):
        shift = round_index % len(runs)  # rotated, so no contender always runs on a warmer machine
        for name, run in runs[shift:] + runs[:shift]:
            print(f"round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            run(root / f"{name}-{round_index}")
            figures = drains[name][-1] if name in drains else {"idle_cpu_pct": latencies[-1]["idle_cpu_pct"]}
            print("  " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), file=sys.stderr, flush=True)
    return drains, latencies


def report(
    args: argparse.Namespace, drains: dict[str, list[dict[str, float]]], latencies: list[dict[str, Any]]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "bench": "sqlite_bus",
        "n": args.n,
        "rounds": args.rounds,
        "worker": f"-c {args.concurrency} --prefetch {args.prefetch}",
        "drain_msgs_per_s": {name: spread([r["msgs_per_s"] for r in runs]) for name, runs in drains.items()},
        "consumer_cpu_us_per_msg": {name: spread([r["cpu_us_per_msg"] for r in runs]) for name, runs in drains.items()},
        "consumer_cores": {name: spread([r["cores"] for r in runs], 2) for name, runs in drains.items()},
    }
    delays_ms = sorted(d * 1000 for run in latencies for d in run["latencies_s"])
    out["latency"] = {
        "rate_per_s": args.rate,
        "messages": len(delays_ms),
        "p50_ms": round(statistics.median(delays_ms), 2),
        "p99_ms": round(delays_ms[min(len(delays_ms) - 1, int(len(delays_ms) * 0.99))], 2),
        "max_ms": round(delays_ms[-1], 2),
        "idle_cpu_pct": spread([run["idle_cpu_pct"] for run in latencies], 2),
    }
    medians = {name: statistics.median(r["msgs_per_s"] for r in runs) for name, runs in drains.items()}
    cpu = {name: statistics.median(r["cpu_us_per_msg"] for r in runs) for name, runs in drains.items()}
    out["ratio"] = {
        "drain_vs_plain_sqlite3": round(medians["hedwig_1"] / medians["plain_sqlite3"], 3),
        "two_workers_vs_one": round(medians["hedwig_2"] / medians["hedwig_1"], 3),
        # CPU per message of the loop over the worker's: what the drain ratio would be with a core each,
        # and steadier than it on a machine that other work keeps busy
        "drain_cpu_vs_plain_sqlite3": round(cpu["plain_sqlite3"] / cpu["hedwig_1"], 3),
    }
    return out


def print_summary(out: dict[str, Any]) -> None:
    for name, figures in out["drain_msgs_per_s"].items():
        cpu = out["consumer_cpu_us_per_msg"][name]
        print(
            f"{name:14} drain {figures['median']:>9.1f} msgs/s ({figures['min']:.1f}-{figures['max']:.1f}), "
            f"consumer CPU {cpu['median']:.1f} us/msg on {out['consumer_cores'][name]['median']:.2f} cores",
            file=sys.stderr,
        )
    lat = out["latency"]
    print(
        f"latency at {lat['rate_per_s']:g}/s: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms; "
        f"idle worker CPU {lat['idle_cpu_pct']['median']}%",
        file=sys.stderr,
    )
    print(f"ratios: {out['ratio']}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="messages per drain run (%(default)s)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="rounds (%(default)s)")
    parser.add_argument("-c", "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="worker -c")
    parser.add_argument("--prefetch", type=int, default=DEFAULT_PREFETCH, help="worker --prefetch")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="latency: messages a second")
    parser.add_argument("--latency-n", type=int, default=DEFAULT_LATENCY_N, help="latency: messages per round")
    parser.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S, help="seconds of idle CPU measured")
    parser.add_argument("--celery", action="store_true", help="also run end to end against Celery (slow)")
    parser.add_argument("--celery-n", type=int, default=DEFAULT_CELERY_N, help="messages per Celery run")
    parser.add_argument("--celery-rounds", type=int, default=2, help="rounds of the Celery comparison")
    args = parser.parse_args(argv)
    if args.n < 1 or args.rounds < 1 or args.latency_n < 1:
        parser.error("--n, --rounds and --latency-n must be 1 or more")
    return args


def celery_args(args: argparse.Namespace) -> argparse.Namespace:
    """The end-to-end comparison's settings (``_end_to_end.py``), with this run's worker settings."""
    return argparse.Namespace(
        n=args.celery_n,
        rounds=args.celery_rounds,
        timeout=900.0,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        celery_pool="threads",
        celery_concurrency=args.concurrency,
        celery_prefetch_multiplier=4,
        publish_many=0,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hedwig-bench-"))
    load_before = os.getloadavg()
    try:
        out = report(args, *run_rounds(args, root))
        # the machine's load (1, 5, 15 minutes) before and after: the figures are worth less on a busy one
        out["load_avg"] = {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        }
        if args.celery:
            celery = versus_celery(celery_args(args), root / "celery")
            out["end_to_end"] = celery
            for variant in ("celery_sqla", "celery_sqla_wal"):
                out["ratio"][f"end_to_end_vs_{variant}"] = celery[f"ratio_{variant}"]["throughput"]
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_summary(out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
