"""Discovered by the hedwig_tasks.django app config at start-up."""

from __future__ import annotations

import json
import os

from hedwig_tasks.conf import handler
from hedwig_tasks.models import Message


@handler("user-created", "1.*")  # type: ignore[untyped-decorator]  # conf.handler is typed as returning Any
def user_created(message: Message) -> None:
    with open(os.environ["PROC_RESULTS"], "a") as f:
        f.write(json.dumps({"id": message.id, "user_id": message.data["user_id"]}) + "\n")
