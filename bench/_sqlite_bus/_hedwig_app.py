"""The hedwig-tasks side of ``bench/sqlite_bus.py``: one message type and a handler that counts.

The worker loads it with ``-A _hedwig_app``; the bench runs it as a script to provision the bus
and to publish::

    python _hedwig_app.py provision
    python _hedwig_app.py publish N            # one hedwig.publish() per message, as a user does
    python _hedwig_app.py publish N --batch K  # K messages per transaction via transport.publish_many
    python _hedwig_app.py publish N --rate R   # R messages a second, each stamped with when it was sent
    python _hedwig_app.py load N --go FILE     # encode N, wait for FILE, store them in one transaction

The bus is ``$HEDWIG_TRANSPORT_URL``; ``BENCH_N`` and ``BENCH_OUT`` configure the tally (see
``_tally.py``); a worker touches ``$BENCH_READY`` once consuming, when it is set. Schema
validation stays on for publishing and handling alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _tally import Tally

from hedwig_tasks import Hedwig, Message, signals
from hedwig_tasks.validators.base import to_transport

hedwig = Hedwig("bench", schema=Path(__file__).with_name("schema.json"))
tally = Tally()


@hedwig.handler("bench-tick", "1.*")
def tick(message: Message) -> None:
    sent_at = message.headers.get("sent_at")
    tally.hit(message.data["n"], float(sent_at) if sent_at else None)


def _on_ready(sender: Hedwig, **kwargs: object) -> None:
    if os.environ.get("BENCH_READY"):
        Path(os.environ["BENCH_READY"]).touch()


def _on_shutdown(sender: Hedwig, **kwargs: object) -> None:
    tally.write()


signals.worker_ready.connect(_on_ready, sender=hedwig)
signals.worker_shutdown.connect(_on_shutdown, sender=hedwig)


def publish(count: int) -> None:
    for n in range(count):
        hedwig.publish("bench-tick", "1.0", {"n": n})


def paced(count: int, rate: float) -> None:
    """``count`` publishes at ``rate`` a second on a fixed schedule, each stamped as it starts."""
    started = time.monotonic()
    for n in range(count):
        pause_s = started + n / rate - time.monotonic()
        if pause_s > 0:
            time.sleep(pause_s)
        hedwig.publish("bench-tick", "1.0", {"n": n}, headers={"sent_at": repr(time.time())})


def encoded(start: int, stop: int) -> list[tuple[bytes, dict[str, str]]]:
    """Messages ``start`` to ``stop``, validated and encoded as ``publish`` does."""
    text_only = hedwig.transport.capabilities.text_only
    rows = []
    for n in range(start, stop):
        message = hedwig.validator.encode(hedwig.message("bench-tick", "1.0", {"n": n}))
        body, attributes = to_transport(message, text_only=text_only)
        rows.append((body, dict(attributes)))
    return rows


def publish_many(count: int, batch: int) -> None:
    """Validate and encode each message as ``publish`` does, then store ``batch`` per transaction."""
    topic = hedwig.router.topic_for("bench-tick", 1)
    for start in range(0, count, batch):
        hedwig.transport.publish_many(topic, encoded(start, min(start + batch, count)))


def load(count: int, go: Path) -> float:
    """Encode ``count`` messages, wait for ``go`` to exist, store them all in one transaction."""
    rows = encoded(0, count)
    hedwig.transport.publish_many(hedwig.router.topic_for("bench-tick", 1), [])  # connect beforehand
    while not go.exists():
        time.sleep(0.001)
    hedwig.transport.publish_many(hedwig.router.topic_for("bench-tick", 1), rows)
    return time.time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["provision", "publish", "load"])
    parser.add_argument("count", type=int, nargs="?", default=0)
    parser.add_argument("--batch", type=int, default=0, help="messages per transaction (publish_many)")
    parser.add_argument("--rate", type=float, default=0.0, help="messages a second, stamped (latency)")
    parser.add_argument("--go", type=Path, help="load: the file whose creation starts the store")
    args = parser.parse_args()
    if args.action == "provision":
        hedwig.provision()
        return
    if args.action == "load":
        json.dump({"loaded_at": load(args.count, args.go)}, sys.stdout)
        return
    started = time.time()
    if args.batch:
        publish_many(args.count, args.batch)
    elif args.rate:
        paced(args.count, args.rate)
    else:
        publish(args.count)
    json.dump({"publish_started_at": started, "publish_done_at": time.time()}, sys.stdout)


if __name__ == "__main__":
    main()
