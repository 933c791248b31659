"""Publish a few orders the way a Hedwig service does: SETTINGS_MODULE=aws_settings python publish.py [COUNT]"""

from __future__ import annotations

import sys

from hedwig_tasks.models import Message

count = int(sys.argv[1]) if len(sys.argv) > 1 else 3
for number in range(1, count + 1):
    data = {"order_id": f"O{number}", "email": f"customer{number}@example.com", "total_cents": 100 * number}
    message = Message.new("order-placed", "1.0", data, headers={"request_id": f"r-{number}"}).publish()
    print(f"published order-placed 1.0 id={message.id}")
