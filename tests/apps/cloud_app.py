"""An app for worker processes on the cloud transports (moto, the Pub/Sub emulator); set by the environment.

``HEDWIG_TRANSPORT_URL`` names the transport, ``CLOUD_APP_NAME`` the app (its queue) and
``CLOUD_APP_TOPIC`` the topic its messages go to, so each test has its own. Each
handler run appends one JSON line to ``$CLOUD_RESULTS``: event (start, end), pid, message id,
user_id, attempt and wall time. ``user_id`` prefixes choose a behaviour: ``slow`` sleeps
``$CLOUD_SLOW_S`` seconds, ``fail`` raises, ``later`` asks to be retried in 20 minutes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from hedwig_tasks import Hedwig, Message, Retry, RetryPolicy

SCHEMA = Path(__file__).parent.parent / "schemas" / "schema.json"
#: The retry delay ``later-*`` messages ask for: past SQS's 15-minute DelaySeconds limit and
#: Pub/Sub's 600-second ack deadline.
LATER_S = 1200.0

hedwig = Hedwig(
    os.environ.get("CLOUD_APP_NAME", "cloudapp"),
    schema=SCHEMA,
    routing={"user-created": os.environ.get("CLOUD_APP_TOPIC", "user-created-v1")},
    retry=RetryPolicy(max_retries=2, backoff_s=0.5, jitter=False),
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
    fd = os.open(os.environ["CLOUD_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


@hedwig.handler("user-created", "1.*")
def user_created(message: Message) -> None:
    _record("start", message)
    user_id = message.data["user_id"]
    if user_id.startswith("slow"):
        time.sleep(float(os.environ.get("CLOUD_SLOW_S", "0.5")))
    if user_id.startswith("fail"):
        raise ValueError(f"cannot create {user_id}")
    if user_id.startswith("later"):
        raise Retry("not yet", delay_s=LATER_S)
    _record("end", message)
