"""How long the dashboard's dead-letter pages take with 10,000 dead letters on the SQLite bus.

The issue's budget is 300 ms a page. This fills a fresh bus with ``--dead-letters`` dead
letters (published, then dead-lettered straight from a consumer), serves the app's dashboard on
a free loopback port, and times the JSON API that the page's table reads, each query read anew
from the bus (the browser's cache of the last read is dropped first): the first page, a page
deep in the list, a filter by type and reason on its last page, and an age filter that matches
nothing (so every dead letter is scanned). Rounds rotate the order of the queries.

The page itself adds one fetch of this API and the rendering of 50 rows (the browser test
checks that no more are rendered); this bench does not drive a browser.

Run: ``python bench/dashboard.py [--dead-letters 10000] [--rounds 5]``. Prints ONE JSON line:
``{"bench": "dashboard", "ms": {query: {"median": .., "spread": [min, max]}}, "ratio":
{query: median / 300 ms}}`` (a ratio under 1 is within the budget).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from hedwig_tasks import Hedwig
from hedwig_tasks.dashboard.server import Dashboard

BUDGET_MS = 300.0
SCHEMA = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "schema.json"
QUERIES = {
    "first page": "",
    "page 150": "?page=150",
    "type+reason, last page": "?type=send_email&reason=bounced&page=199",
    "older than 1h (none)": "?older_than=1h",
}


def fill(app: Hedwig, count: int) -> None:
    topic = app.subscribed_topics()[0]
    encoded = [
        app.encode(app.message("send_email", "1.0", {"to": f"n{i}@example.com", "subject": "hello"}))
        for i in range(count)
    ]
    for start in range(0, count, 500):
        app.transport.publish_many(topic, encoded[start : start + 500])
    consumer = app.transport.consumer(app.queue, [topic])
    done = 0
    while done < count:
        deliveries = consumer.receive(1000, 0.5)
        for delivery in deliveries:
            consumer.dead_letter(delivery, "bounced")
        done += len(deliveries)
    consumer.close()


def time_query(dashboard: Dashboard, query: str) -> float:
    dashboard.dead_letters.forget()
    started = time.perf_counter()
    with urllib.request.urlopen(dashboard.url + "api/dead-letters" + query, timeout=60) as response:
        json.load(response)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dead-letters", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        app = Hedwig("dashbench", schema=SCHEMA, transport=f"sqlite:///{folder}/bus.db")
        app.handler("send_email", "1.*")(lambda message: None)
        app.provision()
        fill(app, args.dead_letters)
        dashboard = Dashboard(app, port=0, sample_s=60)
        dashboard.start()
        taken: dict[str, list[float]] = {name: [] for name in QUERIES}
        names = list(QUERIES)
        try:
            for round_ in range(args.rounds):
                order = names[round_ % len(names) :] + names[: round_ % len(names)]
                for name in order:
                    taken[name].append(time_query(dashboard, QUERIES[name]))
                print(f"round {round_ + 1}: " + ", ".join(f"{n} {taken[n][-1]:.0f} ms" for n in names), file=sys.stderr)
        finally:
            dashboard.close()
            app.close()
    medians = {name: statistics.median(values) for name, values in taken.items()}
    print(
        json.dumps(
            {
                "bench": "dashboard",
                "dead_letters": args.dead_letters,
                "rounds": args.rounds,
                "ms": {
                    n: {"median": round(medians[n], 1), "spread": [round(min(v), 1), round(max(v), 1)]}
                    for n, v in taken.items()
                },
                "ratio": {name: round(median / BUDGET_MS, 3) for name, median in medians.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
