"""Handlers of the shop app, found by ``hedwig_tasks.django.HedwigTasksConfig`` at start-up.

Any installed app's ``handlers`` (or ``tasks``) module is imported, so these register on the app
that Django's settings describe.
"""

from __future__ import annotations

import logging

from hedwig_tasks.conf import handler
from hedwig_tasks.models import Message

logger = logging.getLogger("shop")


@handler("order-placed", "1.*")
def order_placed(message: Message) -> None:
    """Ask for a receipt: another message, so sending it retries on its own."""
    logger.info("order %s placed: %s cents", message.data["order_id"], message.data["total_cents"])
    Message.new("send_receipt", "1.0", {"order_id": message.data["order_id"], "email": message.data["email"]}).publish()


@handler("send_receipt", "1.*")
def send_receipt(message: Message) -> None:
    logger.info("receipt for order %s sent to %s", message.data["order_id"], message.data["email"])
