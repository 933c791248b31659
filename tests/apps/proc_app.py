"""An app for tests that run real worker processes; configured through the environment.

Each handler run appends one JSON line to ``$PROC_RESULTS``: event (start, end), pid, message
id, user_id, attempt and wall time. ``user_id`` prefixes choose a behaviour: ``fail`` raises,
``slow`` sleeps ``$PROC_SLOW_S`` seconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hedwig_tasks import Hedwig, Message, RetryPolicy

SCHEMA = Path(__file__).parent.parent / "schemas" / "schema.json"

hedwig = Hedwig(
    os.environ.get("PROC_APP_NAME", "procapp"),
    schema=SCHEMA,
    retry=RetryPolicy(max_retries=2, backoff_s=0.3, jitter=False),
)


def _record(event: str, message: Message) -> None:
    line = {
        "event": event,
        "pid": os.getpid(),
        "id": message.id,
        "user_id": message.data["user_id"],
        "attempt": message.delivery.attempt if message.delivery else 0,
        "t": time.time(),
    }
    fd = os.open(os.environ["PROC_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


@hedwig.handler("user-created", "1.*")
def user_created(message: Message) -> None:
    _record("start", message)
    user_id = message.data["user_id"]
    if user_id.startswith("slow"):
        time.sleep(float(os.environ.get("PROC_SLOW_S", "0.5")))
    if user_id.startswith("fail"):
        raise ValueError(f"cannot create {user_id}")
    _record("end", message)
