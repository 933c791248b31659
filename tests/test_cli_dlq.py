"""``hedwig-tasks dlq`` through the real command on the embedded SQLite bus: a table with the
total, JSON lines, filters, show, and requeue and purge that ask first and report progress."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import cli, one_error, project

FAILING = """
from pathlib import Path
from typing import Any

from hedwig_tasks import DeadLetter, Hedwig, Message

hedwig = Hedwig("dlqtest", schema=Path(__file__).with_name("schema.json"))


@hedwig.handler("send_email", "1.*")
def send_email(message: Message) -> None:
    raise DeadLetter(f"bounced: {message.data['to']}")


@hedwig.handler("user-created", "1.*")
def created(message: Message) -> None:
    raise DeadLetter("no such user")
"""

PUBLISH = """
from failing import hedwig

hedwig.provision()
for n in range(3):
    hedwig.publish("send_email", "1.0", {"to": f"to{n}@example.com", "subject": "s"})
for n in range(2):
    hedwig.publish("user-created", "1.0", {"user_id": f"U{n}", "email": f"u{n}@example.com"})
"""


@pytest.fixture(scope="module")
def dead(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose bus holds five dead letters: three send_email, two user-created. Tests that
    change them copy the bus first."""
    folder = project(tmp_path_factory.mktemp("dlq"))
    (folder / "failing.py").write_text(FAILING)
    subprocess.run([sys.executable, "-c", PUBLISH], cwd=folder, check=True, capture_output=True, timeout=60)
    worker = cli(folder, "worker", "-A", "failing", "--burst")
    assert worker.returncode == 0, worker.stderr
    return folder


@pytest.fixture
def copy(dead: Path, tmp_path: Path) -> Path:
    """The project with a bus of its own, to requeue or purge."""
    folder = project(tmp_path)
    (folder / "failing.py").write_text(FAILING)
    (folder / ".hedwig").mkdir()
    for file in (dead / ".hedwig").glob("bus.db*"):
        (folder / ".hedwig" / file.name).write_bytes(file.read_bytes())
    return folder


def listed(folder: Path, *args: str) -> list[dict[str, Any]]:
    result = cli(folder, "dlq", "list", "-A", "failing", "--json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_list_is_a_table_with_the_total(dead: Path) -> None:
    result = cli(dead, "dlq", "list", "-A", "failing", "--limit", "4")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["id", "type", "version", "subscription", "attempts", "died", "(UTC)", "reason"]
    assert len(rows) == 4
    assert any("send_email" in row and "1.0" in row and "bounced: to" in row for row in rows)
    assert result.stderr.strip() == "4 of 5 dead letter(s) of dlqtest shown, oldest first (--limit N for more)"


def test_list_json_has_every_field(dead: Path) -> None:
    records = listed(dead)
    assert len(records) == 5
    first = records[0]
    assert set(first) == {
        "id", "hedwig_id", "type", "version", "subscription", "attempts", "dead_at", "reason", "attributes", "body",
    }  # fmt: skip
    assert sorted(str(r["type"]) for r in records) == ["send_email"] * 3 + ["user-created"] * 2
    assert all(r["id"] and r["attempts"] == 1 for r in records)


def test_list_filters(dead: Path) -> None:
    assert [r["type"] for r in listed(dead, "--type", "user-created")] == ["user-created"] * 2
    assert len(listed(dead, "--reason", "BOUNCED")) == 3
    assert len(listed(dead, "--subscription", "send_email")) == 3
    assert len(listed(dead, "--newer-than", "1h")) == 5
    assert listed(dead, "--older-than", "1h") == []
    result = cli(dead, "dlq", "list", "-A", "failing", "--reason", "such user")
    assert result.stderr.strip() == "2 matching dead letter(s) shown (all 5 read; 5 in all)"
    refused = cli(dead, "dlq", "list", "-A", "failing", "--older-than", "soon")
    assert refused.returncode == 2 and "'soon' is not an age" in refused.stderr


def test_show_one_in_full(dead: Path) -> None:
    record = listed(dead, "--type", "send_email", "--limit", "1")[0]
    result = cli(dead, "dlq", "show", "-A", "failing", str(record["id"]))
    assert result.returncode == 0, result.stderr
    assert f"id:            {record['id']}" in result.stdout
    assert f"reason:        {record['reason']}" in result.stdout
    assert '"subject": "s"' in result.stdout
    missing = cli(dead, "dlq", "show", "-A", "failing", "no-such-id")
    assert missing.returncode == 1
    assert "no dead letter of dlqtest has id 'no-such-id'" in one_error(missing)


def test_requeue_by_id_asks_first(copy: Path) -> None:
    chosen = listed(copy)[0]["id"]
    declined = cli(copy, "dlq", "requeue", "-A", "failing", str(chosen), stdin="n\n")
    assert declined.returncode == 1
    assert "requeue 1 dead letter(s) of dlqtest back to the subscriptions they came from? [y/N]" in declined.stderr
    assert "not confirmed; nothing requeued" in declined.stderr
    assert len(listed(copy)) == 5
    accepted = cli(copy, "dlq", "requeue", "-A", "failing", str(chosen), stdin="y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert "requeued 1 dead letter(s) of dlqtest" in accepted.stderr
    assert chosen not in [r["id"] for r in listed(copy)]
    status = cli(copy, "status", "-A", "failing")
    assert sum(int(line.split()[1]) for line in status.stdout.splitlines()[1:]) == 1  # waiting again


def test_purge_by_filter_with_yes_and_progress(copy: Path) -> None:
    result = cli(copy, "dlq", "purge", "-A", "failing", "--type", "send_email", "--yes")
    assert result.returncode == 0, result.stderr
    assert "purged 3/3" in result.stderr  # progress, as lines when stderr is not a terminal
    assert result.stderr.strip().endswith("purged 3 dead letter(s) of dlqtest")
    assert [r["type"] for r in listed(copy)] == ["user-created"] * 2
    nothing = cli(copy, "dlq", "purge", "-A", "failing", "--type", "send_email", "--yes")
    assert "no dead letter of dlqtest matches; nothing purged" in nothing.stderr
    everything = cli(copy, "dlq", "purge", "-A", "failing", stdin="y\n")
    assert "purge all 2 dead letter(s) of dlqtest for good? [y/N]" in everything.stderr
    assert listed(copy) == []
