"""A small service: welcomes new users by e-mail.

Run from this folder:

    hedwig-tasks provision -A tasks    # once: the topics and this service's subscriptions
    python publish.py 5                # some sign-ups
    hedwig-tasks worker -A tasks       # handle them (add --burst to exit when done)
"""

from __future__ import annotations

import logging
from pathlib import Path

from hedwig_tasks import Hedwig, Message, RetryPolicy

logger = logging.getLogger("quickstart")

hedwig = Hedwig("quickstart", schema=Path(__file__).with_name("schema.json"))


@hedwig.handler("user-created", "1.*")
def welcome(message: Message) -> None:
    """A user signed up: ask for a welcome e-mail (another message, so it retries on its own)."""
    send_email.publish(
        to=message.data["email"],
        subject="Welcome!",
        template="welcome",
        headers={"request_id": message.headers.get("request_id", message.id)},
    )


@hedwig.handler("send_email", "1.*", retry=RetryPolicy(max_retries=3, backoff_s=1.0))
def send_email(message: Message) -> None:
    """Pretend to send an e-mail."""
    logger.info(
        "e-mail to %s: %s (request %s)",
        message.data["to"],
        message.data["subject"],
        message.headers.get("request_id", "-"),
    )
