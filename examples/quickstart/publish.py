"""Publish a few sign-ups onto the embedded bus: python publish.py [COUNT]

Provision the bus first (once): hedwig-tasks provision -A tasks
"""

from __future__ import annotations

import sys

from tasks import hedwig

count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
for number in range(1, count + 1):
    message = hedwig.publish(
        "user-created",
        "1.0",
        {"user_id": f"U{number}", "email": f"user{number}@example.com"},
        headers={"request_id": f"signup-{number}"},
    )
    print(f"published user-created 1.0 id={message.id}")
