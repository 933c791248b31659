"""A typed service: what it publishes and handles is checked by mypy, through schema_types.py.

schema_types.py is generated from schema.json (the authority); after changing the schema,
regenerate it from this folder:

    hedwig-tasks schema codegen schema.json --out schema_types.py

Then ``mypy app.py`` flags a publish whose fields no longer fit, and
``hedwig-tasks worker -A app`` runs the handler as usual.
"""

from __future__ import annotations

from pathlib import Path

from schema_types import publish_send_email_v1, publish_user_created_v1, user_created_v1_data

from hedwig_tasks import Hedwig, Message

hedwig = Hedwig("typed", schema=Path(__file__).with_name("schema.json"))


def sign_up(user_id: str, email: str) -> Message:
    """Announce a new user: a ``user-created`` 1.0 message, its fields checked by mypy."""
    return publish_user_created_v1(hedwig, {"user_id": user_id, "email": email, "plan": "free"})


@hedwig.handler("user-created", "1.*")
def welcome(message: Message) -> None:
    """Ask for a welcome e-mail; ``user`` is a ``UserCreatedV1``, so ``user["email"]`` is a ``str``."""
    user = user_created_v1_data(message)
    publish_send_email_v1(
        hedwig,
        {"to": user["email"], "subject": "Welcome!", "attachments": [{"name": "guide.pdf", "size_bytes": 1024}]},
        headers={"request_id": message.id},
    )
