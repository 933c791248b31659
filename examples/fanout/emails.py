"""A consumer: confirms each order by e-mail. hedwig-tasks worker -A emails"""

from __future__ import annotations

import logging
from pathlib import Path

from hedwig_tasks import Hedwig, Message

logger = logging.getLogger("emails")

emails = Hedwig("emails", schema=Path(__file__).with_name("schema.json"), transport="sqlite:///.hedwig/bus.db")


@emails.handler("order-placed", "1.*")
def confirm(message: Message) -> None:
    logger.info("emails: confirmation of order %s to %s", message.data["order_id"], message.data["email"])
