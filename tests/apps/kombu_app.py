"""``apps.proc_app``'s handler on a topic of the test's own (``$KOMBU_TOPIC``), for shared brokers.

The transport comes from ``$HEDWIG_TRANSPORT_URL`` and the app's name from ``$PROC_APP_NAME``.
"""

from __future__ import annotations

import os
import time

from apps.proc_app import SCHEMA, _record
from hedwig_tasks import Hedwig, Message, RetryPolicy

hedwig = Hedwig(
    os.environ.get("PROC_APP_NAME", "procapp"),
    schema=SCHEMA,
    routing={"user-created": os.environ.get("KOMBU_TOPIC", "user-created-v1")},
    retry=RetryPolicy(max_retries=2, backoff_s=0.3, jitter=False),
)


@hedwig.handler("user-created", "1.*")
def user_created(message: Message) -> None:
    _record("start", message)
    user_id = message.data["user_id"]
    if user_id.startswith("slow"):
        time.sleep(float(os.environ.get("PROC_SLOW_S", "0.5")))
    if user_id.startswith("fail"):
        raise ValueError(f"cannot create {user_id}")
    _record("end", message)
