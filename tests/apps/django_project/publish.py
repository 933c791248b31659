"""Publishes on commit inside a Django transaction; prints what the bus held before and after."""

from __future__ import annotations

import django

django.setup()

from django.db import transaction  # noqa: E402

from hedwig_tasks.conf import default_app  # noqa: E402
from hedwig_tasks.django import publish_on_commit  # noqa: E402
from hedwig_tasks.models import Message  # noqa: E402


def depth() -> int:
    app = default_app()
    return sum(row.depth or 0 for row in app.transport.status(app.queue, app.subscribed_topics()))


default_app().provision()
with transaction.atomic():
    publish_on_commit(Message.new("user-created", "1.0", {"user_id": "U1"}))
    Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "hi"}).publish()
    print("inside", depth())
print("after", depth())
with transaction.atomic():
    publish_on_commit(Message.new("user-created", "1.0", {"user_id": "U2"}))
    transaction.set_rollback(True)
print("rolled back", depth())
