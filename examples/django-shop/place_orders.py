"""Place two orders and one that fails: python place_orders.py (with DJANGO_SETTINGS_MODULE set)."""

from __future__ import annotations

import django

django.setup()

from shop.orders import place_order  # noqa: E402

from hedwig_tasks.conf import default_app  # noqa: E402

default_app().provision()  # once, before the first deploy: topics and the SHOP subscriptions
place_order("O1", "ann@example.com", 1250)
place_order("O2", "bob@example.com", 900)
try:
    place_order("O3", "cat@example.com", 400, fail=True)
except RuntimeError as error:
    print(f"rolled back: {error}")
print("placed O1 and O2")
