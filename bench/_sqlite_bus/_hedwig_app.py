"""The hedwig-tasks side of ``bench/sqlite_bus.py``: one message type and a handler that counts.

The worker loads it with ``-A _hedwig_app``; the bench runs it as a script to provision the bus
and to publish::

    python _hedwig_app.py provision
    python _hedwig_app.py publish N            # one hedwig.publish() per message, as a user does
    python _hedwig_app.py publish N --batch K  # K messages per transaction via transport.publish_many

The bus is ``$HEDWIG_TRANSPORT_URL``; ``BENCH_N`` and ``BENCH_OUT`` configure the tally (see
``_tally.py``). Schema validation stays on for publishing and handling alike.
"""

from __future__ import annotations

import argparse
import json
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
    tally.hit(message.data["n"])


def _on_shutdown(sender: Hedwig, **kwargs: object) -> None:
    tally.write()


signals.worker_shutdown.connect(_on_shutdown, sender=hedwig)


def publish(count: int) -> None:
    for n in range(count):
        hedwig.publish("bench-tick", "1.0", {"n": n})


def publish_many(count: int, batch: int) -> None:
    """Validate and encode each message as ``publish`` does, then store ``batch`` per transaction."""
    transport = hedwig.transport
    topic = hedwig.router.topic_for("bench-tick", 1)
    text_only = transport.capabilities.text_only
    for start in range(0, count, batch):
        rows = []
        for n in range(start, min(start + batch, count)):
            encoded = hedwig.validator.encode(hedwig.message("bench-tick", "1.0", {"n": n}))
            rows.append(to_transport(encoded, text_only=text_only))
        transport.publish_many(topic, rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["provision", "publish"])
    parser.add_argument("count", type=int, nargs="?", default=0)
    parser.add_argument("--batch", type=int, default=0, help="messages per transaction (publish_many)")
    args = parser.parse_args()
    if args.action == "provision":
        hedwig.provision()
        return
    started = time.time()
    if args.batch:
        publish_many(args.count, args.batch)
    else:
        publish(args.count)
    json.dump({"publish_started_at": started, "publish_done_at": time.time()}, sys.stdout)


if __name__ == "__main__":
    main()
