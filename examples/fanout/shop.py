"""The publishing service: places orders. python shop.py [COUNT]

It has no handlers: it publishes ``order-placed`` and never consumes. Whoever subscribes to the
topic gets a copy of each order (here billing.py and emails.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hedwig_tasks import Hedwig

BUS = "sqlite:///.hedwig/bus.db"  # one file, shared by the three processes (run them from this folder)

shop = Hedwig("shop", schema=Path(__file__).with_name("schema.json"), transport=BUS)

if __name__ == "__main__":
    shop.provision()  # the topic order-placed-v1 (idempotent); subscribers provision their own queues
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for number in range(1, count + 1):
        order = {"order_id": f"O{number}", "email": f"customer{number}@example.com", "total_cents": 1250 * number}
        message = shop.publish("order-placed", "1.0", order)
        print(f"placed order O{number} id={message.id}")
