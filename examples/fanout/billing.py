"""A consumer: charges each order. hedwig-tasks worker -A billing"""

from __future__ import annotations

import logging
from pathlib import Path

from hedwig_tasks import Hedwig, Message

logger = logging.getLogger("billing")

billing = Hedwig("billing", schema=Path(__file__).with_name("schema.json"), transport="sqlite:///.hedwig/bus.db")


@billing.handler("order-placed", "1.*")
def charge(message: Message) -> None:
    logger.info("billing: charged %s cents for order %s", message.data["total_cents"], message.data["order_id"])
