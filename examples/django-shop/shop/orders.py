"""What a view would call: place an order and tell the other services, once the order is saved."""

from __future__ import annotations

from django.db import transaction

from hedwig_tasks.django import publish_on_commit
from hedwig_tasks.models import Message


def place_order(order_id: str, email: str, total_cents: int, *, fail: bool = False) -> None:
    """Save an order (here: nothing to save) and publish ``order-placed`` when the transaction commits.

    The message is validated now, so a bad one fails the request; it is published only if the
    transaction commits, so no service hears of an order that was rolled back.
    """
    with transaction.atomic():
        message = Message.new("order-placed", "1.0", {"order_id": order_id, "email": email, "total_cents": total_cents})
        publish_on_commit(message)
        if fail:
            raise RuntimeError(f"order {order_id} could not be saved")
