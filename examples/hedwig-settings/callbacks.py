"""The service's callbacks, named by dotted path in HEDWIG_CALLBACKS, as in a Hedwig service."""

from __future__ import annotations

import logging

from hedwig_tasks.models import Message

logger = logging.getLogger("orders")


def order_placed(message: Message) -> None:
    logger.info("order %s placed by %s (via %s)", message.data["order_id"], message.data["email"], message.publisher)
