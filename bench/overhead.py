"""Per-message cost of tracing and metrics, on the in-process transport.

Each variant publishes N small messages and handles them with a burst worker, all in one
process, so what differs between the variants is only the observability work:

* ``off``: ``Hedwig(..., tracing=False)``, no metrics;
* ``api``: tracing on with only opentelemetry-api (no SDK configured: the usual default);
* ``sdk``: tracing on with the SDK recording every span to an in-memory exporter;
* ``metrics``: tracing off, Prometheus metrics collecting from the signals.

Usage: python bench/overhead.py [--n 3000] [--rounds 3]
The last line on stdout is one JSON object with microseconds per message and each variant's
``ratio`` to ``off``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from hedwig_tasks import Hedwig
from hedwig_tasks.metrics import Metrics
from hedwig_tasks.transports.memory import MemoryTransport
from hedwig_tasks.worker import Worker, WorkerOptions

SCHEMA = Path(__file__).resolve().parent.parent / "tests" / "schemas" / "schema.json"


def run_once(n: int, *, tracing: bool, metrics: bool) -> float:
    """Seconds to publish and handle ``n`` messages."""
    bus = MemoryTransport()
    app = Hedwig("bench", schema=SCHEMA, transport=bus, tracing=tracing)
    app.handler("user-created", "1.*")(lambda message: None)
    app.provision()
    collector = Metrics(app) if metrics else None
    started = time.perf_counter()
    for number in range(n):
        app.publish("user-created", "1.0", {"user_id": f"U{number}"}, headers={"request_id": "r"})
    Worker(app, WorkerOptions(burst=True, wait_s=0.01, concurrency=1, prefetch=100)).run()
    elapsed = time.perf_counter() - started
    if collector is not None:
        assert collector.value("hedwig_handled_total", "user-created", 1) == n
        collector.close()
    return elapsed


def install_sdk() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace.set_tracer_provider(provider)
    return exporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    variants = {"off": {"tracing": False, "metrics": False}, "api": {"tracing": True, "metrics": False}}
    variants["metrics"] = {"tracing": False, "metrics": True}
    best: dict[str, float] = {}
    run_once(200, tracing=False, metrics=False)  # warm up imports and caches
    for _ in range(args.rounds):
        for name, options in variants.items():
            best[name] = min(best.get(name, float("inf")), run_once(args.n, **options))
    exporter = install_sdk()  # the SDK stays installed once set, so it runs last
    for _ in range(args.rounds):
        exporter.clear()
        best["sdk"] = min(best.get("sdk", float("inf")), run_once(args.n, tracing=True, metrics=False))
    assert len(exporter.get_finished_spans()) == 2 * args.n
    per_message_us = {name: seconds / args.n * 1e6 for name, seconds in best.items()}
    for name, us in per_message_us.items():
        print(f"{name:8} {us:8.1f} us/message", file=sys.stderr)
    result = {
        "bench": "overhead",
        "n": args.n,
        "us_per_message": {name: round(us, 1) for name, us in per_message_us.items()},
        "ratio": {name: round(us / per_message_us["off"], 3) for name, us in per_message_us.items() if name != "off"},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
