"""SQLite bus rows whose own fields cannot be read: each is dead-lettered with a reason, the rest go on.

The rows are written straight into the bus file with :mod:`sqlite3`, as another process (an
older version, a script, a hand edit) would, behind or ahead of messages the app published.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import SCHEMA_FILE

from hedwig_tasks import Hedwig, Message
from hedwig_tasks.transports import _sqlite_sql as sqlite_sql
from hedwig_tasks.transports.sqlite import SQLiteTransport
from hedwig_tasks.worker import Worker, WorkerOptions

QUEUE = "svc"
TOPIC = "send_email-v1"
GOOD_BODY = json.dumps({"to": "raw@example.com", "subject": "written by hand"}).encode()
GOOD_ATTRIBUTES = {
    "hedwig_format_version": "1.0",
    "hedwig_id": "8f5e8f9e-0000-4000-8000-000000000001",
    "hedwig_message_timestamp": "1700000000000",
    "hedwig_publisher": "elsewhere",
    "hedwig_schema": "https://hedwig-tasks.test/schema#/schemas/send_email/1.0",
}


class Text(bytes):
    """Bytes to store as a TEXT value as they are, even when they are not UTF-8."""


def insert_row(path: Path, **columns: Any) -> None:
    """One row of ``QUEUE``'s subscription to ``TOPIC``, written by a plain sqlite3 connection."""
    row: dict[str, Any] = {
        "subscription": f"{QUEUE}:{TOPIC}",
        "topic": TOPIC,
        "message_id": "raw-1",
        "body": GOOD_BODY,
        "attributes": json.dumps(GOOD_ATTRIBUTES),
        "attempts": 0,
        "visible_at": 0.0,
        "created_at": 0.0,
        **columns,
    }
    places = ", ".join("CAST(? AS TEXT)" if isinstance(v, Text) else "?" for v in row.values())
    with contextlib.closing(sqlite3.connect(path)) as raw, raw:
        raw.execute(
            f"INSERT INTO messages ({', '.join(row)}) VALUES ({places})",
            [bytes(v) if isinstance(v, Text) else v for v in row.values()],
        )


#: (what is wrong, the columns written, what the fault must say)
UNREADABLE: list[tuple[str, dict[str, Any], str]] = [
    ("attributes not JSON", {"attributes": "hedwig_id=1"}, "attributes are not JSON"),
    ("attributes a JSON list", {"attributes": '["hedwig_id", "1"]'}, "attributes are a JSON array, not an object"),
    ("attributes nested too deep", {"attributes": "[" * 100_000 + "]" * 100_000}, "attributes are not JSON"),
    (
        "a non-string attribute",
        {"attributes": json.dumps({**GOOD_ATTRIBUTES, "retries": 3})},
        "attribute 'retries' is 3",
    ),
    ("attributes not UTF-8", {"attributes": Text(b'{"a": "\xff"}')}, "attributes are not UTF-8"),
    ("attributes a blob not UTF-8", {"attributes": b"\xfe\xff"}, "attributes are not UTF-8"),
    ("body a number", {"body": 42}, "body is an integer, not bytes"),
    ("body a real", {"body": 4.5}, "body is a real, not bytes"),
    ("message id not UTF-8", {"message_id": Text(b"id-\xff")}, "message id is not UTF-8"),
    ("attempt count a fraction", {"attempts": 2.5}, "attempt count 3.5 is not a whole number"),
    ("attempt count past int64", {"attempts": 2**63 - 1}, "attempt count 9.2"),
    ("attempt count negative", {"attempts": -5}, "attempt count -4 is not a whole number"),
]


@pytest.fixture(params=["returning", "select-then-update"])
def bus(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A provisioned bus, claiming as SQLite 3.35+ does (UPDATE ... RETURNING) or as older SQLite does."""
    monkeypatch.setattr(sqlite_sql, "HAS_RETURNING", request.param == "returning")
    transport = SQLiteTransport(tmp_path / "bus.db")
    transport.provision(QUEUE, [TOPIC], [])
    yield transport
    transport.close()


@pytest.mark.parametrize(("case", "columns", "fault"), UNREADABLE, ids=[c[0] for c in UNREADABLE])
def test_receive_returns_an_unreadable_row_with_its_fault(
    bus: SQLiteTransport, case: str, columns: dict[str, Any], fault: str
) -> None:
    insert_row(bus.path, **columns)
    bus.publish(TOPIC, b"good", {"k": "v"})
    consumer = bus.consumer(QUEUE, [TOPIC])
    bad, good = consumer.receive(10, wait_s=0)
    assert fault in bad.fault
    assert isinstance(bad.body, bytes)
    assert isinstance(bad.attempt, int)
    assert bad.attempt >= 1
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in bad.attributes.items())
    assert isinstance(bad.transport_id, str)
    assert (good.body, dict(good.attributes), good.fault) == (b"good", {"k": "v"}, "")
    consumer.dead_letter(bad, f"unreadable delivery: {bad.fault}")
    [record] = bus.dead_letters(QUEUE)
    assert record.reason == f"unreadable delivery: {bad.fault}"
    assert isinstance(record.body, bytes)
    assert isinstance(record.attempts, int)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in record.attributes.items())
    assert bus.status(QUEUE, [TOPIC])[0].depth == 0  # only the good one, still leased


def test_an_unreadable_body_keeps_its_raw_bytes_and_attempt_one(bus: SQLiteTransport) -> None:
    insert_row(bus.path, body=42, attempts=2.5)
    [bad] = bus.consumer(QUEUE, [TOPIC]).receive(1, wait_s=0)
    assert (bad.body, bad.attempt) == (b"42", 1)
    assert "body is an integer" in bad.fault
    assert "attempt count 3.5" in bad.fault


@pytest.mark.parametrize(
    "columns",
    [
        {"body": Text(GOOD_BODY)},  # a body stored as TEXT: its UTF-8 bytes are the body
        {"attributes": json.dumps(GOOD_ATTRIBUTES).encode()},  # attributes stored as a blob of JSON
        {"visible_at": "2024-01-01T00:00:00Z"},  # a visibility time that is not a number: visible now
        {"attempts": "three"},  # SQLite reads a count that is not a number as 0: this is attempt 1
    ],
    ids=["text body", "blob attributes", "text visible_at", "text attempts"],
)
def test_rows_sqlite_can_still_read_are_delivered_whole(bus: SQLiteTransport, columns: dict[str, Any]) -> None:
    insert_row(bus.path, **columns)
    [delivery] = bus.consumer(QUEUE, [TOPIC]).receive(1, wait_s=0)
    assert delivery.fault == ""
    assert (delivery.body, dict(delivery.attributes), delivery.attempt) == (GOOD_BODY, GOOD_ATTRIBUTES, 1)


def test_worker_dead_letters_unreadable_rows_and_handles_the_good_ones_behind_them(tmp_path: Path) -> None:
    bus = SQLiteTransport(tmp_path / "bus.db")
    app = Hedwig(QUEUE, schema=SCHEMA_FILE, transport=bus)
    handled: list[str] = []

    @app.handler("send_email", "1.*")
    def send_email(message: Message) -> None:
        handled.append(message.data["to"])

    app.provision()
    for _case, columns, _fault in UNREADABLE:
        insert_row(bus.path, **columns)
    insert_row(bus.path, message_id="raw-good")  # a good row written the same way, behind the bad ones
    for number in range(3):
        send_email.publish(to=f"user{number}@example.com", subject="hi")

    worker = Worker(app, WorkerOptions(burst=True, wait_s=0.05, concurrency=2, prefetch=4))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:  # the old code let a row's JSON error out of receive
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(60)
    if runner.is_alive():  # the old code redelivered some rows forever: burst mode never ended
        worker.stop()
        runner.join(10)
        pytest.fail(f"the burst worker did not finish; handled {handled}")
    assert errors == []

    assert sorted(handled) == ["raw@example.com", "user0@example.com", "user1@example.com", "user2@example.com"]
    records = bus.dead_letters(QUEUE)
    reasons = sorted(r.reason for r in records)
    assert len(reasons) == len(UNREADABLE)
    for _case, _columns, fault in UNREADABLE:
        assert [r for r in reasons if r.startswith("unreadable delivery: ") and fault in r], fault
    assert bus.status(QUEUE, [TOPIC])[0].depth == 0
    bus.close()
