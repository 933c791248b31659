"""Publish a few orders: python publish.py [COUNT]. Provision first: hedwig-tasks provision -A tasks"""

from __future__ import annotations

import sys

from orders_pb2 import OrderPlacedV1
from tasks import hedwig

from hedwig_tasks import ValidationError

count = int(sys.argv[1]) if len(sys.argv) > 1 else 3
for number in range(1, count + 1):
    order = OrderPlacedV1(order_id=f"O{number}", total_cents=999 * number, skus=[f"SKU-{number}", "SKU-GIFT"])
    message = hedwig.publish("order-placed", "1.1", order)  # a message instance...
    print(f"published order-placed {message.version} id={message.id} ({len(order.SerializeToString())} bytes)")
hedwig.publish("order-placed", "1.0", {"order_id": "O-dict", "totalCents": "5"})  # ...or a dict of its fields

try:
    hedwig.publish("order-placed", "1.0", {"order_id": "O-bad", "total_cents": "not a number"})
except ValidationError as error:
    print(f"refused: {error}")
