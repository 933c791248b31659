"""The SQLite bus's dead letters: list, requeue and purge them, all of a queue's or some by id.

A dead letter's ``transport_id`` is the message id its delivery had (shared by the fan-out
copies of one publish, each kept by its own queue), so the id in a worker's log line finds it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from hedwig_tasks.transports._sqlite_db import BusFile
from hedwig_tasks.transports._sqlite_rows import attributes_of, text_of, whole
from hedwig_tasks.transports._sqlite_wake import WakeChannel
from hedwig_tasks.transports.base import DeadLetterRecord, Progress

__all__ = ["DeadLetters"]

#: Most dead letters moved back or deleted per transaction, in rows.
DEFAULT_CHUNK = 500

_FIELDS = """
SELECT id, CAST(body AS BLOB), CAST(attributes AS BLOB), reason, subscription, attempts, dead_at,
       CAST(message_id AS BLOB)
FROM dead_letters
"""
_ALL = _FIELDS + "WHERE queue = ? ORDER BY id LIMIT ?"
_ROW_IDS = "SELECT id FROM dead_letters WHERE queue = ? ORDER BY id LIMIT ?"
_UNBURY = """
INSERT INTO messages (subscription, topic, message_id, body, attributes, visible_at, created_at)
SELECT subscription, topic, message_id, body, attributes, ?, ? FROM dead_letters WHERE id IN ({places}) ORDER BY id
"""
_FORGET = "DELETE FROM dead_letters WHERE id IN ({places})"


def _by_message(what: str, count: int) -> str:
    """``what`` (the fields or the row ids) of a queue's dead letters with one of ``count`` message ids."""
    places = ",".join("?" * count)
    return f"{what} WHERE queue = ? AND message_id IN ({places}) ORDER BY id LIMIT ?"


def _chunks(items: list[str] | list[int], size: int = DEFAULT_CHUNK) -> Iterator[list[str] | list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class DeadLetters:
    """One bus file's dead-letter store."""

    def __init__(self, bus: BusFile, wake: WakeChannel) -> None:
        self._bus = bus
        self._wake = wake

    def records(self, queue: str, *, limit: int, ids: Collection[str] | None) -> list[DeadLetterRecord]:
        """The oldest ``limit`` (of those ``ids`` names); unreadable attributes show as ``{}``."""
        with self._bus.reading("list dead letters") as connection:
            if ids is None:
                found = connection.execute(_ALL, (queue, limit)).fetchall()
            else:
                found = []
                for chunk in _chunks(sorted(set(ids))):
                    found += connection.execute(_by_message(_FIELDS, len(chunk)), (queue, *chunk, limit)).fetchall()
                found = sorted(found)[:limit]
        return [_record(row) for row in found]

    def requeue(self, queue: str, *, limit: int | None, progress: Progress | None, ids: Collection[str] | None) -> int:
        """Move them back to their subscriptions, attempts reset, ``DEFAULT_CHUNK`` per transaction."""
        moved = self._each_chunk("requeue dead letters", queue, limit, progress, ids, requeue=True)
        if moved:
            self._wake.notify()
        return moved

    def purge(self, queue: str, *, limit: int | None, progress: Progress | None, ids: Collection[str] | None) -> int:
        """Delete them for good, ``DEFAULT_CHUNK`` per transaction."""
        return self._each_chunk("purge dead letters", queue, limit, progress, ids, requeue=False)

    def _each_chunk(
        self,
        doing: str,
        queue: str,
        limit: int | None,
        progress: Progress | None,
        ids: Collection[str] | None,
        *,
        requeue: bool,
    ) -> int:
        row_ids = self._row_ids(queue, limit, ids)
        done = 0
        for chunk in _chunks(row_ids):
            done += self._settle_chunk(doing, chunk, requeue=requeue)  # fewer if someone else took some
            if progress is not None:
                progress(done, len(row_ids))
        return done

    def _row_ids(self, queue: str, limit: int | None, ids: Collection[str] | None) -> list[int]:
        """The row ids chosen, oldest first; a negative SQLite LIMIT means none."""
        most = -1 if limit is None else limit
        with self._bus.reading("find dead letters") as connection:
            if ids is None:
                return [row_id for (row_id,) in connection.execute(_ROW_IDS, (queue, most))]
            chosen: list[int] = []
            for chunk in _chunks(sorted(set(ids))):
                sql = _by_message("SELECT id FROM dead_letters", len(chunk))
                chosen += [row_id for (row_id,) in connection.execute(sql, (queue, *chunk, most))]
        chosen.sort()
        return chosen if limit is None else chosen[:limit]

    def _settle_chunk(self, doing: str, row_ids: list[str] | list[int], *, requeue: bool) -> int:
        places = ",".join("?" * len(row_ids))
        with self._bus.writing(doing) as connection:
            if requeue:
                now = self._bus.clock()
                connection.execute(_UNBURY.format(places=places), (now, now, *row_ids))
            return connection.execute(_FORGET.format(places=places), row_ids).rowcount


def _record(row: tuple[int, bytes, bytes, str, str, object, float, bytes]) -> DeadLetterRecord:
    _, body, attributes, reason, subscription, attempts, dead_at, message_id = row
    return DeadLetterRecord(
        bytes(body),
        attributes_of(attributes)[0],
        reason,
        subscription,
        whole(attempts),
        dead_at,
        text_of(message_id, "message id is")[0],
    )
