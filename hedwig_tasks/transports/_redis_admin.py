"""The Redis transport's administration: provisioning streams and consumer groups, ``status``
and ``counts``, and the dead letters (list, requeue, purge). See ``redis.py`` for the design."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import redis.exceptions

from hedwig_tasks.transports._redis_client import RedisLink
from hedwig_tasks.transports._redis_wire import (
    dead_letter_record,
    delayed_key,
    dlq_key,
    queue_key,
    stream_key,
    subscription_name,
)
from hedwig_tasks.transports.base import DeadLetterRecord, Progress, SubscriptionStatus

__all__ = ["RedisAdmin"]

#: Most entries ``counts`` reads of the queue's own streams and delayed set to tell whose they are.
COUNTS_SCAN = 1000
#: The same for ``status``.
STATUS_SCAN = 100_000
#: Dead letters moved or deleted per script call (and between calls of the progress callback).
BATCH = 100
#: A stream entry id.
_ENTRY_ID = re.compile(r"\d+-\d+")
#: A group made only to create an empty stream, and removed in the same transaction.
_MAKER_GROUP = "hedwig-tasks-provision"


class RedisAdmin:
    """Provisioning, counts and dead letters on one Redis; errors become ``TransportError``."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link

    # -- provisioning -------------------------------------------------------------------------

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Create the topics' streams, the queue's group on each topic it subscribes to (reading
        from now on, as a new subscription does elsewhere), its own stream and dead-letter stream
        with the group reading from their start. Idempotent; returns the actions taken."""
        topics = list(dict.fromkeys([*publish, *subscribe]))
        groups = self._groups_wanted(queue, subscribe)
        with self._link.errors("provision"):
            actions, streams, missing = self._plan(topics, groups, queue or "")
            if not dry_run:
                self._create(streams, missing, queue or "")
        return actions

    def _groups_wanted(self, queue: str | None, subscribe: Sequence[str]) -> list[tuple[str, str, str]]:
        """(stream, start id, what it is) of each group ``queue`` needs."""
        if not queue:
            return []
        wanted = [(stream_key(t), "$", f"subscribe {queue} to {t}") for t in dict.fromkeys(subscribe)]
        wanted.append((queue_key(queue), "0", f"create {queue}'s own stream {queue_key(queue)}"))
        wanted.append((dlq_key(queue), "0", f"create {queue}'s dead-letter stream {dlq_key(queue)}"))
        return wanted

    def _plan(
        self, topics: list[str], groups: list[tuple[str, str, str]], queue: str
    ) -> tuple[list[str], list[str], list[tuple[str, str]]]:
        """The actions, the topic streams to create, and the (stream, start) of each group to create."""
        client = self._link.client
        pipe = client.pipeline(transaction=False)
        for topic in topics:
            pipe.exists(stream_key(topic))
        for stream, _, _ in groups:
            pipe.xinfo_groups(stream)
        replies = pipe.execute(raise_on_error=False)
        exists, infos = replies[: len(topics)], replies[len(topics) :]
        actions = [f"create topic {t}" for t, found in zip(topics, exists, strict=True) if not found]
        streams = [stream_key(t) for t, found in zip(topics, exists, strict=True) if not found]
        missing: list[tuple[str, str]] = []
        for (stream, start, action), info in zip(groups, infos, strict=True):
            if not _has_group(info, queue):
                actions.append(action)
                missing.append((stream, start))
        return actions, streams, missing

    def _create(self, streams: list[str], missing: list[tuple[str, str]], queue: str) -> None:
        pipe = self._link.client.pipeline(transaction=True)
        for stream in streams:  # an empty stream: made with a group, which goes at once
            pipe.xgroup_create(stream, _MAKER_GROUP, "$", mkstream=True)
            pipe.xgroup_destroy(stream, _MAKER_GROUP)
        for stream, start in missing:
            pipe.xgroup_create(stream, queue, start, mkstream=True)
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
                raise reply  # another provision made it meanwhile: fine; anything else is not

    # -- counting -----------------------------------------------------------------------------

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """Depth (not yet delivered, leases run out, delayed retries), in flight, dead letters."""
        return self._counts(queue, topics, STATUS_SCAN, "status")

    def counts(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """As :meth:`status`, reading at most ``COUNTS_SCAN`` entries of the queue's own streams."""
        return self._counts(queue, topics, COUNTS_SCAN, "counts")

    def _counts(self, queue: str, topics: Sequence[str], scan: int, doing: str) -> list[SubscriptionStatus]:
        keys = [queue_key(queue), delayed_key(queue), dlq_key(queue), *(stream_key(t) for t in topics)]
        names = [subscription_name(queue, t) for t in topics]
        with self._link.errors(doing):
            flat = self._link.script("counts")(keys=keys, args=[queue, self._link.lease_ms, scan, *names])
        return [
            SubscriptionStatus(
                name,
                topic,
                int(flat[3 * i]),
                int(flat[3 * i + 1]),
                int(flat[3 * i + 2]),
                details={
                    "stream": stream_key(topic),
                    "group": queue,
                    "retries and requeues": queue_key(queue),
                    "dead letters": dlq_key(queue),
                },
            )
            for i, (name, topic) in enumerate(zip(names, topics, strict=True))
        ]

    # -- dead letters -------------------------------------------------------------------------

    def dead_letters(
        self, queue: str, *, limit: int = 100, ids: Collection[str] | None = None
    ) -> list[DeadLetterRecord]:
        """The oldest ``limit`` dead letters (or those of ``ids``), left in place."""
        with self._link.errors("list dead letters"):
            return [dead_letter_record(i, f) for i, f in self._live(queue, limit, ids)]

    def requeue_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Move dead letters into the queue's own stream, whose group reads them again."""
        keys = [dlq_key(queue), queue_key(queue)]
        return self._each_batch("requeue dead letters", "requeue", keys, queue, limit, progress, ids)

    def purge_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Delete dead letters for good."""
        return self._each_batch("purge dead letters", "purge", [dlq_key(queue)], queue, limit, progress, ids)

    def _each_batch(
        self,
        doing: str,
        script: str,
        keys: list[str],
        queue: str,
        limit: int | None,
        progress: Progress | None,
        ids: Collection[str] | None,
    ) -> int:
        done = 0
        with self._link.errors(doing):
            chosen = [entry_id for entry_id, _ in self._live(queue, limit, ids)]
            for start in range(0, len(chosen), BATCH):
                batch = chosen[start : start + BATCH]
                done += int(self._link.script(script)(keys=keys, args=[queue, *batch]))
                if progress is not None:
                    progress(done, len(chosen))
        return done

    def _live(self, queue: str, limit: int | None, ids: Collection[str] | None) -> list[tuple[bytes, Any]]:
        """The dead letters still dead: entries the queue's group has not been handed (the Hedwig
        library's requeue reads them as the group, and acknowledges each it moved) or holds unacked."""
        key = dlq_key(queue)
        still = self._still_dead(key, queue)
        found: list[tuple[bytes, Any]] = []
        for entry_id, fields in self._entries(key, ids):
            if limit is not None and len(found) >= limit:
                break
            if still(entry_id):
                found.append((entry_id, fields))
        return found

    def _entries(self, key: str, ids: Collection[str] | None) -> Iterator[tuple[bytes, Any]]:
        client = self._link.client
        if ids is not None:
            pipe = client.pipeline(transaction=False)
            for entry_id in dict.fromkeys(i for i in ids if _ENTRY_ID.fullmatch(i)):
                pipe.xrange(key, entry_id, entry_id)
            for reply in pipe.execute():
                yield from reply
            return
        start = "-"
        while True:
            page = client.xrange(key, start, "+", count=BATCH)
            yield from page
            if len(page) < BATCH:
                return
            start = "(" + page[-1][0].decode()

    def _still_dead(self, key: str, queue: str) -> Any:
        client = self._link.client
        try:
            info = next((g for g in client.xinfo_groups(key) if g["name"] in (queue, queue.encode())), None)
        except redis.exceptions.ResponseError:  # no such stream
            info = None
        if info is None:
            return lambda entry_id: True
        last = _id_tuple(info["last-delivered-id"])
        pending = (
            {p["message_id"] for p in client.xpending_range(key, queue, "-", "+", 100_000)}
            if info["pending"]
            else set()
        )
        return lambda entry_id: _id_tuple(entry_id) > last or entry_id in pending


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _has_group(reply: Any, group: str) -> bool:
    if isinstance(reply, Exception):
        return False
    return any(info.get(b"name", info.get("name")) in (group, group.encode()) for info in reply)
