"""The Pub/Sub transport's administration: provisioning topics and subscriptions (with their
dead-letter and retry policies), checking that subscriptions exist, and listing and requeueing
an app's dead letters, all through the shared
:class:`~hedwig_tasks.transports._gcp_client.PubSubClient`. See ``gcp.py`` for the design."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from google.api_core import exceptions as google_exceptions

from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.transports._gcp_client import (
    CALL_TIMEOUT_S,
    MAX_ACK_DEADLINE_S,
    MAX_BATCH,
    MIN_SUBSCRIPTION_DEADLINE_S,
    PubSubClient,
    pubsub_errors,
    short,
)
from hedwig_tasks.transports._gcp_wire import (
    DEAD_AT_ATTRIBUTE,
    DEAD_ATTEMPTS_ATTRIBUTE,
    GOOGLE_DEAD_PREFIX,
    REASON_ATTRIBUTE,
    SOURCE_ATTRIBUTE,
    clean,
    whole,
)
from hedwig_tasks.transports._plan import Planned
from hedwig_tasks.transports.base import DeadLetterRecord, Progress

__all__ = ["UNCOUNTED", "DeadLetterQueue", "Provisioner", "check_subscription", "describe_subscription"]

#: Retention of the dead-letter subscription, in seconds (the Pub/Sub maximum, 7 days).
DLQ_RETENTION_S = 604800
#: How long a dead-letter read waits for more before it believes there are none, in seconds.
DLQ_WAIT_S = 0.5


def check_subscription(client: PubSubClient, name: str) -> None:
    """Raise ``TransportError`` (saying to provision) unless subscription ``name`` exists."""
    with pubsub_errors(f"reading subscription {name}"):
        client.subscriber.get_subscription(subscription=client.subscription_path(name), timeout=CALL_TIMEOUT_S)


#: Why ``status`` shows no counts on Pub/Sub.
UNCOUNTED = (
    "Pub/Sub's API reports no message counts; backlog and dead letters are Cloud Monitoring metrics "
    "(subscription/num_undelivered_messages, subscription/oldest_unacked_message_age), "
    "and `hedwig-tasks dlq list` reads the dead letters themselves"
)


def describe_subscription(client: PubSubClient, name: str) -> dict[str, str]:
    """What Pub/Sub's API tells of subscription ``name``; ``TransportError`` (saying to provision) if missing."""
    with pubsub_errors(f"reading subscription {name}"):
        found = client.subscriber.get_subscription(subscription=client.subscription_path(name), timeout=CALL_TIMEOUT_S)
    details = {"exists": f"yes, on topic {short(found.topic)}", "ack deadline": f"{found.ack_deadline_seconds} s"}
    policy = found.dead_letter_policy
    if policy and policy.dead_letter_topic:
        details["dead-letter topic"] = (
            f"{short(policy.dead_letter_topic)} (after {policy.max_delivery_attempts} deliveries)"
        )
    else:
        details["dead-letter topic"] = "none: a message that keeps failing is redelivered for as long as it is kept"
    retention = found.message_retention_duration
    if retention:
        details["retention"] = _duration(retention.total_seconds())
    return details


def _duration(seconds: float) -> str:
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{int(seconds // 86400)} days"
    if seconds >= 3600:
        return f"{seconds / 3600:g} hours"
    return f"{seconds:g} s"


# -- provisioning -----------------------------------------------------------------------------


class Provisioner:
    """Creates what is missing, in dependency order, and says what it did (or would do).

    A topic or subscription another process creates meanwhile is success, not an error.
    ``plan`` holds a :class:`Planned` record per action. ``offline`` plans everything as
    missing without a call to Google (what Terraform is written from); it implies a dry run,
    and a client with no project gets ``<project>`` in its paths.
    """

    def __init__(
        self,
        client: PubSubClient,
        *,
        lease_s: float,
        max_delivery_attempts: int,
        retry_backoff_s: tuple[float, float] | None,
        dry_run: bool,
        offline: bool = False,
    ) -> None:
        self.client = client
        self.lease_s = lease_s
        self.max_delivery_attempts = max_delivery_attempts
        self.retry_backoff_s = retry_backoff_s
        self.dry_run = dry_run or offline
        self.offline = offline
        self.plan: list[Planned] = []
        self._created: set[str] = set()

    @property
    def actions(self) -> list[str]:
        """A line per action, as a dry run prints them."""
        return [planned.action for planned in self.plan]

    def topic_path(self, topic: str, owner: str | None = None) -> str:
        if self.offline and not owner and not self.client.project:
            return f"projects/<project>/topics/hedwig-{topic}"
        return self.client.topic_path(topic, owner)

    def subscription_path(self, name: str) -> str:
        if self.offline and not self.client.project:
            return f"projects/<project>/subscriptions/{name}"
        return self.client.subscription_path(name)

    def run(self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str]) -> list[str]:
        """Provision, and return a line per action taken (or, dry, that would be taken)."""
        client = self.client
        own_topics = [t for t in dict.fromkeys([*publish, *subscribe]) if t not in client.foreign]
        for topic in own_topics:
            self.topic(topic, topic)
        if queue:
            self.topic(queue, f"{queue} (the app's own, for requeues and long retries)")
            self.topic(f"{queue}-dlq", f"{queue}-dlq (dead letters)")
            dlq = self.topic_path(f"{queue}-dlq")
            for topic in dict.fromkeys(subscribe):
                self.subscription(queue, topic, self.topic_path(topic, client.foreign.get(topic)), dlq)
            self.subscription(queue, None, self.topic_path(queue), dlq)
            self.subscription(queue, "dlq", dlq, None)
        return self.actions

    def _exists(self, get: Callable[..., Any], **request: str) -> bool:
        with pubsub_errors(f"reading {next(iter(request.values()))}"):
            try:
                get(**request, timeout=CALL_TIMEOUT_S)
            except google_exceptions.NotFound:
                return False
        return True

    def topic(self, topic: str, described: str) -> None:
        path = self.topic_path(topic)
        if path in self._created or (not self.offline and self._exists(self.client.publisher.get_topic, topic=path)):
            return
        self.plan.append(Planned.of("pubsub_topic", short(path), f"create topic {described}: {path}"))
        self._created.add(path)
        if not self.dry_run:
            with pubsub_errors(f"creating topic {path}"), contextlib.suppress(google_exceptions.AlreadyExists):
                self.client.publisher.create_topic(name=path, timeout=CALL_TIMEOUT_S)

    def subscription(self, queue: str, topic: str | None, topic_path: str, dlq: str | None) -> None:
        name = self.client.dlq_name(queue) if topic == "dlq" else self.client.subscription_name(queue, topic)
        path = self.subscription_path(name)
        if not self.offline and self._exists(self.client.subscriber.get_subscription, subscription=path):
            return
        request: dict[str, Any] = {
            "name": path,
            "topic": topic_path,
            "ack_deadline_seconds": int(min(max(self.lease_s, MIN_SUBSCRIPTION_DEADLINE_S), MAX_ACK_DEADLINE_S)),
        }
        if dlq is None:
            request["message_retention_duration"] = {"seconds": DLQ_RETENTION_S}
            action = f"create subscription {name} to {short(topic_path)} (dead letters of {queue})"
        else:
            request.update(self._policies(dlq))
            what = topic if topic is not None else f"its own topic {short(topic_path)}"
            action = f"subscribe {queue} to {what}: {name} (dead letters after {self.max_delivery_attempts} deliveries)"
        self.plan.append(Planned.of("pubsub_subscription", name, action, _settings(request)))
        if not self.dry_run:
            with pubsub_errors(f"creating subscription {name}"), contextlib.suppress(google_exceptions.AlreadyExists):
                self.client.subscriber.create_subscription(request=request, timeout=CALL_TIMEOUT_S)

    def _policies(self, dlq: str) -> dict[str, Any]:
        """A subscription's dead-letter policy (the safety net) and, if asked for, its retry policy."""
        policies: dict[str, Any] = {
            "dead_letter_policy": {"dead_letter_topic": dlq, "max_delivery_attempts": self.max_delivery_attempts}
        }
        if self.retry_backoff_s is not None:
            low, high = self.retry_backoff_s
            policies["retry_policy"] = {
                "minimum_backoff": {"seconds": int(low)},
                "maximum_backoff": {"seconds": int(high)},
            }
        return policies


def _settings(request: dict[str, Any]) -> dict[str, object]:
    """A subscription request's settings, flat, for its :class:`Planned` record. The topic of
    another project keeps its path; ours are named alone."""
    topic = str(request["topic"])
    dead = request.get("dead_letter_policy") or {}
    retry = request.get("retry_policy") or {}
    return {
        "topic": short(topic) if _ours(topic, request["name"]) else topic,
        "ack_deadline_seconds": request["ack_deadline_seconds"],
        "message_retention_seconds": (request.get("message_retention_duration") or {}).get("seconds"),
        "dead_letter_topic": short(dead["dead_letter_topic"]) if dead else None,
        "max_delivery_attempts": dead.get("max_delivery_attempts"),
        "minimum_backoff_seconds": (retry.get("minimum_backoff") or {}).get("seconds"),
        "maximum_backoff_seconds": (retry.get("maximum_backoff") or {}).get("seconds"),
    }


def _ours(topic_path: str, subscription_path: str) -> bool:
    """Whether the topic is in the subscription's project."""
    return topic_path.split("/")[1] == subscription_path.split("/")[1]


# -- dead letters -----------------------------------------------------------------------------


class DeadLetterQueue:
    """An app's dead letters: subscription ``hedwig-<queue>-dlq``, read, given back or requeued."""

    def __init__(self, client: PubSubClient, queue: str) -> None:
        self.client = client
        self.queue = queue
        self.path = client.subscription_path(client.dlq_name(queue))

    def give_back(self, ack_ids: list[str]) -> None:
        """Make these dead letters visible again at once."""
        self.client.modify_ack_deadline(self.path, ack_ids, 0, doing=f"giving back dead letters of {self.queue}")

    def read(self, limit: int, ids: Collection[str] | None = None) -> list[DeadLetterRecord]:
        """Up to ``limit`` dead letters (of ``ids`` only, if given), oldest first, given back at once."""
        items: list[Any] = []
        kept: list[Any] = []
        seen: set[str] = set()
        while len(kept) < limit and (ids is None or len(kept) < len(ids)):
            fresh = self._pull(MAX_BATCH if ids is not None else limit - len(kept), seen)
            if not fresh:
                break
            items += fresh
            kept += [item for item in fresh if ids is None or item.message.message_id in ids]
        if items:
            self.give_back([item.ack_id for item in items])
        return sorted((_record(item) for item in kept[:limit]), key=lambda record: record.dead_at)

    def requeue(self, limit: int | None, progress: Progress | None, ids: Collection[str] | None = None) -> int:
        """Republish dead letters to the app's own topic, as they were before they died, then
        acknowledge them here; returns how many moved. A failed publish gives its batch back."""
        own = self.client.topic_path(self.queue)

        def republish(batch: list[Any]) -> None:
            messages = [(bytes(item.message.data), clean(item.message.attributes)) for item in batch]
            try:
                self.client.publish(own, messages, topic=self.queue)
            except PublishError:
                self.give_back([item.ack_id for item in batch])
                raise
            self.client.acknowledge(
                self.path, [item.ack_id for item in batch], doing=f"acknowledging requeued dead letters of {self.queue}"
            )

        return self._settle(republish, limit, progress, ids)

    def purge(self, limit: int | None, progress: Progress | None, ids: Collection[str] | None = None) -> int:
        """Acknowledge dead letters here, so they are gone for good; returns how many."""

        def drop(batch: list[Any]) -> None:
            self.client.acknowledge(
                self.path, [item.ack_id for item in batch], doing=f"purging dead letters of {self.queue}"
            )

        return self._settle(drop, limit, progress, ids)

    def _settle(
        self,
        act: Callable[[list[Any]], None],
        limit: int | None,
        progress: Progress | None,
        ids: Collection[str] | None,
    ) -> int:
        """Pull batches, ``act`` on those chosen (all, or ``ids``), give the others back at the end."""
        done = 0
        seen: set[str] = set()
        passed: list[str] = []
        total = None if ids is None else len(ids) if limit is None else min(limit, len(ids))
        wanted = limit if total is None else total
        try:
            while wanted is None or done < wanted:
                batch = self._pull(MAX_BATCH if wanted is None or ids is not None else wanted - done, seen)
                if not batch:
                    break
                matching = [item for item in batch if ids is None or item.message.message_id in ids]
                chosen = matching if wanted is None else matching[: wanted - done]
                taken = {item.ack_id for item in chosen}
                passed += [item.ack_id for item in batch if item.ack_id not in taken]
                if chosen:
                    act(chosen)
                    done += len(chosen)
                    if progress:
                        progress(done, total if total is not None else limit)
        finally:
            if passed:
                self.give_back(passed)
        return done

    def _pull(self, limit: int, seen: set[str]) -> list[Any]:
        """Up to ``limit`` unseen messages; [] once a pull brings nothing new."""
        received = self.client.pull(self.path, limit, DLQ_WAIT_S, doing=f"reading dead letters of {self.queue}")
        fresh = [r for r in received if r.message.message_id not in seen]
        repeated = [r.ack_id for r in received if r.message.message_id in seen]
        if repeated:
            self.give_back(repeated)
        seen.update(r.message.message_id for r in fresh)
        return fresh


def _record(item: Any) -> DeadLetterRecord:
    """A DLQ message as a record: ours carry the reason; Pub/Sub's policy leaves its own marks."""
    message = item.message
    attributes = dict(message.attributes)
    dead_at = message.publish_time.timestamp() if message.publish_time else time.time()
    if REASON_ATTRIBUTE in attributes:
        reason = attributes[REASON_ATTRIBUTE]
        source = attributes.get(SOURCE_ATTRIBUTE, "")
        attempts = whole(attributes.get(DEAD_ATTEMPTS_ATTRIBUTE)) or 0
        dead_at = (whole(attributes.get(DEAD_AT_ATTRIBUTE)) or 0) / 1000 or dead_at
    else:
        source = short(attributes.get(f"{GOOGLE_DEAD_PREFIX}SourceSubscription", ""))
        attempts = whole(attributes.get(f"{GOOGLE_DEAD_PREFIX}SourceDeliveryCount")) or 0
        reason = f"Pub/Sub dead-letter policy: not acknowledged after {attempts} deliveries"
    return DeadLetterRecord(
        bytes(message.data), clean(attributes), reason, source, attempts, dead_at, message.message_id
    )
