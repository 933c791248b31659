"""Post a few sign-ups to the app with Flask's test client: python signups.py [COUNT]"""

from __future__ import annotations

import sys

from web import app, hedwig

hedwig.provision()  # once, before the first deploy
client = app.test_client()
count = int(sys.argv[1]) if len(sys.argv) > 1 else 3
for number in range(1, count + 1):
    response = client.post("/signup", json={"user_id": f"U{number}", "email": f"user{number}@example.com"})
    print(response.status_code, response.get_json()["id"])
