"""Callbacks named by dotted path in HEDWIG_CALLBACKS; each records what it handled."""

from __future__ import annotations

import json
import os

from hedwig_tasks.models import Message

handled: list[Message] = []


def send_email(message: Message) -> None:
    handled.append(message)
    results = os.environ.get("PROC_RESULTS")
    if results:
        with open(results, "a") as f:
            f.write(json.dumps({"id": message.id, "to": message.data["to"], "headers": dict(message.headers)}) + "\n")
