"""The SQLite bus's tables and statements: every SQL text the transport runs, in one place.

A message row is one subscription's copy of a publish. It is visible when ``visible_at`` (epoch
seconds) has passed; a claim leases it by pushing ``visible_at`` to the end of the lease and
setting ``lease`` to the new attempt number, which every settling statement checks, so a
receipt whose lease ran out and was claimed again settles nothing.
"""

from __future__ import annotations

import sqlite3

#: Bumped when the tables change; stored in ``PRAGMA user_version``. Version 2 adds the index
#: that finds a queue's dead letters by message id; the script below upgrades version 1.
SCHEMA_VERSION = 2

SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    queue TEXT NOT NULL,
    topic TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (queue, topic)
);
CREATE INDEX IF NOT EXISTS subscriptions_by_topic ON subscriptions (topic);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    subscription TEXT NOT NULL,           -- "queue:topic"
    topic TEXT NOT NULL,
    message_id TEXT NOT NULL,             -- shared by the fan-out copies of one publish
    body BLOB NOT NULL,
    attributes TEXT NOT NULL,             -- JSON object of strings
    attempts INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,             -- epoch seconds
    lease INTEGER NOT NULL DEFAULT 0,     -- attempt number of the current lease; 0 when not leased
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_claim ON messages (subscription, visible_at, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    subscription TEXT NOT NULL,
    topic TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    attributes TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    dead_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_queue ON dead_letters (queue, id);
CREATE INDEX IF NOT EXISTS dead_letters_by_message ON dead_letters (queue, message_id);
PRAGMA user_version = 2;
COMMIT;
"""

FAN_OUT = """
INSERT INTO messages (subscription, topic, message_id, body, attributes, visible_at, created_at)
SELECT queue || ':' || topic, topic, ?, ?, ?, ?, ? FROM subscriptions WHERE topic = ?
"""
# A row is visible when due, or when its visibility time is not a number (text or a blob from
# some other writer): those sort after every number, so would never come due. Each test is its
# own index range, so a poll never walks the leased and delayed rows in between.
PEEK = """
SELECT 1 FROM messages WHERE subscription = ? AND visible_at <= ?
UNION ALL SELECT 1 FROM messages WHERE subscription = ? AND visible_at >= '' LIMIT 1
"""
#: The bound value with which ``visible_at >= ?`` picks every text and blob, and no number.
UNTIMED = ""
# Claims return the fields another writer may have stored as anything as raw bytes (never as
# text Python must decode, which fails the whole statement on one row that is not UTF-8), with
# the body's storage class, so that one row can become a Delivery with a fault.
# Ordered by visible_at (then id) so the claim index is walked in order and never sorted.
CLAIM_DUE = """
UPDATE messages SET visible_at = ?, attempts = attempts + 1, lease = attempts + 1
WHERE id IN (SELECT id FROM messages WHERE subscription = ? AND visible_at <= ? ORDER BY visible_at, id LIMIT ?)
RETURNING id, lease, typeof(body), CAST(body AS BLOB), CAST(attributes AS BLOB), CAST(message_id AS BLOB)
"""
CLAIM_UNTIMED = """
UPDATE messages SET visible_at = ?, attempts = attempts + 1, lease = attempts + 1
WHERE id IN (SELECT id FROM messages WHERE subscription = ? AND visible_at >= ? ORDER BY visible_at, id LIMIT ?)
RETURNING id, lease, typeof(body), CAST(body AS BLOB), CAST(attributes AS BLOB), CAST(message_id AS BLOB)
"""
# Older SQLite (no RETURNING) picks, then leases, then reads each row.
PICK_OLD = {
    CLAIM_DUE: "SELECT id FROM messages WHERE subscription = ? AND visible_at <= ? ORDER BY visible_at, id LIMIT ?",
    CLAIM_UNTIMED: "SELECT id FROM messages WHERE subscription = ? AND visible_at >= ? ORDER BY visible_at, id LIMIT ?",
}
LEASE_OLD = "UPDATE messages SET visible_at = ?, attempts = attempts + 1, lease = attempts + 1 WHERE id = ?"
LEASED_OLD = """
SELECT id, lease, typeof(body), CAST(body AS BLOB), CAST(attributes AS BLOB), CAST(message_id AS BLOB)
FROM messages WHERE id = ?
"""
ACK = "DELETE FROM messages WHERE id = ? AND lease = ?"
UNLEASE = "UPDATE messages SET visible_at = ?, lease = 0 WHERE id = ? AND lease = ?"
EXTEND = "UPDATE messages SET visible_at = ? WHERE id = ? AND lease = ?"
BURY = """
INSERT INTO dead_letters (queue, subscription, topic, message_id, body, attributes, reason, attempts, dead_at)
SELECT ?, subscription, topic, message_id, body, attributes, ?, attempts, ? FROM messages WHERE id = ? AND lease = ?
"""
COUNT = "SELECT count(*), coalesce(sum(lease > 0 AND visible_at > ?), 0) FROM messages WHERE subscription = ?"
COUNT_DEAD = "SELECT count(*) FROM dead_letters WHERE queue = ? AND subscription = ?"

#: UPDATE ... RETURNING claims a batch in one statement; older SQLite selects then updates.
HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
#: Most receipts one acknowledging statement deletes (two bound values each; SQLite before
#: 3.32 allows 999 bound values in a statement).
ACK_CHUNK = 400


def ack_many(count: int) -> str:
    """One statement deleting ``count`` leased rows, given as (id, lease) pairs.

    Each row is found by its primary key; a pair whose lease moved on matches nothing. One
    statement per batch costs about half as much as a DELETE per row.
    """
    pairs = ",".join(["(?,?)"] * count)
    return (  # only placeholders are formatted in
        f"DELETE FROM messages WHERE id IN (SELECT m.id FROM (VALUES {pairs}) AS r "  # noqa: S608
        "JOIN messages AS m ON m.id = r.column1 AND m.lease = r.column2)"
    )
