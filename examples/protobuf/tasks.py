"""A service whose schema is protobuf: the generated module is the app's schema.

Run from this folder:

    hedwig-tasks provision -A tasks
    python publish.py 3
    hedwig-tasks worker -A tasks --burst
"""

from __future__ import annotations

import logging

import orders_pb2

from hedwig_tasks import Hedwig, Message

logger = logging.getLogger("warehouse")

# Every message class in the module that carries Hedwig's option becomes a (type, major) the app
# knows; a list of classes works too: schema=[orders_pb2.OrderPlacedV1, orders_pb2.ShipOrderV1].
hedwig = Hedwig("warehouse", schema=orders_pb2, transport="sqlite:///.hedwig/bus.db")


@hedwig.handler("order-placed", "1.*")
def pick(message: Message) -> None:
    """``message.data`` is an ``OrderPlacedV1`` instance."""
    order = message.data
    logger.info("picked order %s: %s (version %s)", order.order_id, ", ".join(order.skus), message.version)
    ship.publish(order_id=order.order_id, address="1 Main St")  # keyword arguments are the fields


@hedwig.handler("ShipOrder", "1.*")
def ship(message: Message) -> None:
    logger.info("shipped order %s to %s", message.data.order_id, message.data.address)
