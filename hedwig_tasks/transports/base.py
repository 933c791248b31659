"""The transport contract: what every broker backend does, and nothing more.

A :class:`Transport` publishes bytes with string attributes to a topic and hands out a
:class:`Consumer` for an app's queue. Fan-out is the transport's job: every queue subscribed
to a topic gets its own copy of each message. A consumer receives batches of
:class:`Delivery` and settles each one exactly once: :meth:`Consumer.ack`,
:meth:`Consumer.retry_later`, :meth:`Consumer.dead_letter` or :meth:`Consumer.release`.
Until then a delivery is leased to this consumer (invisible to others) and the lease can be
extended; a lease that runs out makes the message visible again with its attempt count kept.

Transports know nothing of schemas, handlers or retry policy. Each maps its driver's errors
to :class:`~hedwig_tasks.exceptions.TransportError` (or ``PublishError``) at its boundary.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar

from hedwig_tasks.exceptions import ConfigurationError

__all__ = [
    "Capabilities",
    "Consumer",
    "DeadLetterRecord",
    "Delivery",
    "SubscriptionStatus",
    "Transport",
]

#: Called with ``(done, total)`` as long work (a requeue) goes on; total is None if unknown.
Progress = Callable[[int, "int | None"], None]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a transport can do natively; the core adapts to it and enforces its limits.

    The app refuses a publish with more than ``max_attributes`` attributes; the worker clamps a
    retry delay to ``max_delay_s`` and a lease extension to ``max_lease_s``, asks a receive for
    at most ``max_receive_batch``, and provisions a ``local`` bus's subscriptions itself. A
    memory transport built with another transport's capabilities catches that one's limits
    in unit tests.
    """

    text_only: bool = False  #: bodies must be text (binary ones are base64-encoded)
    max_delay_s: float | None = None  #: longest retry delay it keeps (None: no limit)
    max_lease_s: float | None = None  #: longest single lease extension (None: no limit)
    max_receive_batch: int = 1000  #: most deliveries one receive returns
    max_attributes: int | None = None  #: most attributes a message may carry
    #: the bus lives on this machine and costs nothing to set up, so a worker provisions its own
    #: subscriptions when it starts (the SQLite bus, memory); elsewhere that is ``provision``'s job
    local: bool = False
    #: a consumer can take some of its queue's topics and leave the others (False: one stream
    #: per queue carries every topic it is subscribed to, as an SQS queue does)
    per_topic_consumption: bool = True
    #: ``status`` counts depth, in flight and dead letters exactly and at once (False: some are
    #: None or lag, as Pub/Sub's API reports no counts and RabbitMQ none of what is unacked)
    status_counts: bool = True
    #: ``publish(..., delay_s=)`` is kept by the broker, whatever the delay (False: the app
    #: refuses a delayed publish, naming the transport)
    delayed_publish: bool = False


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One received copy of a message, leased to the consumer that received it."""

    body: bytes
    attributes: Mapping[str, str]
    attempt: int  #: 1 on first delivery; counts every receive, including after a lease ran out
    receipt: Any  #: the transport's handle for settling this delivery
    subscription: str  #: the subscription (queue and topic) it came from
    transport_id: str = ""  #: the broker's own message id
    #: Why the transport could not read this delivery's own fields (a body of the wrong type,
    #: an unreadable attempt count or attributes); empty when it could. The worker dead-letters
    #: a delivery with a fault, with the fault as the reason, and never runs a handler for it.
    fault: str = ""


@dataclasses.dataclass(frozen=True)
class DeadLetterRecord:
    """A message in the dead-letter store, with why it is there.

    ``transport_id`` is stable, unique within the queue's dead letters and never empty: it is
    the id ``hedwig-tasks dlq show ID`` and the ``ids=`` of the dead-letter methods take.
    """

    body: bytes
    attributes: Mapping[str, str]
    reason: str
    subscription: str
    attempts: int
    dead_at: float  #: epoch seconds
    transport_id: str = ""


@dataclasses.dataclass(frozen=True)
class SubscriptionStatus:
    """Counts for one subscription; None where the transport cannot tell."""

    subscription: str
    topic: str
    depth: int | None  #: waiting to be received (including delayed retries)
    in_flight: int | None  #: received and not yet settled
    dead_letters: int | None
    #: What else the broker tells of the subscription, as label -> text (its dead-letter topic,
    #: retention, ...); ``hedwig-tasks status`` prints them under the counts.
    details: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Why a count is None, when one is ("Pub/Sub's API reports no counts ...").
    unknown_because: str = ""


class Consumer(abc.ABC):
    """Receives and settles deliveries for one queue. Used from one worker; thread-safe."""

    @abc.abstractmethod
    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, blocking up to ``wait_s`` for the first one.

        Returns an empty list when nothing came in time. Raises ``TransportError`` only when the
        broker itself failed: whatever one message's bytes, headers or attributes, it comes back
        as a :class:`Delivery` (with :attr:`Delivery.fault` set when its fields could not be
        read, the body as raw bytes and the attempt as 1 where the count is unreadable), so
        that it can be dead-lettered and the rest of the batch goes on.
        """

    @abc.abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Settle these as done: they are never delivered again."""

    @abc.abstractmethod
    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        """Make it visible again after ``delay_s``, without holding it in memory."""

    @abc.abstractmethod
    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move it to the dead-letter store with ``reason``; nothing is lost."""

    @abc.abstractmethod
    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        """Keep these leased for ``lease_s`` more seconds from now."""

    @abc.abstractmethod
    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give these back at once, unprocessed (at shutdown): visible to others now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free connections. Deliveries not settled come back when their lease runs out."""


class Transport(abc.ABC):
    """A broker backend, chosen by URL. Construction does no I/O; connecting is lazy."""

    scheme: ClassVar[str]
    #: What it can do natively (an instance may carry other limits than its class's).
    capabilities: Capabilities = Capabilities()
    #: How long a receive leases a delivery before it is offered again, in seconds; the worker's
    #: lease keeper extends by this much.
    lease_s: float = 30.0
    #: The ``messaging.system`` its spans report, as OpenTelemetry's semantic conventions name it.
    messaging_system: str = "unknown"

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> Transport:
        """Build from a connection string; raises ``ConfigurationError`` naming a bad option."""

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> Transport:
        """Build from Hedwig-style settings (anything indexed by setting name).

        Raises ``ConfigurationError`` naming a bad setting, or, for a transport that Hedwig's
        settings cannot describe, saying to set ``HEDWIG_TRANSPORT_URL`` instead.
        """
        raise ConfigurationError(
            f"the {cls.scheme} transport cannot be built from Hedwig's backend settings; set HEDWIG_TRANSPORT_URL"
        )

    @abc.abstractmethod
    def publish(
        self,
        topic: str,
        body: bytes,
        attributes: Mapping[str, str],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> str:
        """Send one message to ``topic``; returns the broker's id. Raises ``PublishError``.

        ``owner`` is the account or project that owns the topic when it is not ours. With
        ``delay_s`` the message is received no earlier than that many seconds from now, the
        broker holding it meanwhile (only where :attr:`Capabilities.delayed_publish`; the app
        asks no other transport for a delay).
        """

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> list[str]:
        """Send many messages to one topic, batched where the broker allows; ids in order."""
        if delay_s > 0:
            return [self.publish(topic, body, attrs, owner=owner, delay_s=delay_s) for body, attrs in messages]
        return [self.publish(topic, body, attributes, owner=owner) for body, attributes in messages]

    @abc.abstractmethod
    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> Consumer:
        """A consumer of ``queue``'s subscriptions to ``topics``.

        ``max_outstanding`` is the most deliveries the caller will hold unsettled at once; a
        transport that pushes messages (streaming pull) must not lease more than that.
        """

    @abc.abstractmethod
    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Create, idempotently, the topics to publish to and the queue's subscriptions.

        Returns a line per action taken (or, with ``dry_run``, that would be taken).
        """

    @abc.abstractmethod
    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """Depth, in flight and dead letters for each of ``queue``'s subscriptions, in full.

        For the ``status`` command; it may read a lot (browse dead letters, scan unacked
        stores). The worker and the metrics endpoint ask :meth:`counts` instead.
        """

    def counts(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """What :meth:`status` says, as far as the broker tells it cheaply: a few round trips.

        Asked by a burst worker each time a receive comes back empty and by every metrics
        scrape. A field the broker cannot count cheaply is None. The default is
        :meth:`status`; a transport whose status is costly overrides this.
        """
        return self.status(queue, topics)

    @abc.abstractmethod
    def dead_letters(
        self, queue: str, *, limit: int = 100, ids: Collection[str] | None = None
    ) -> list[DeadLetterRecord]:
        """The oldest ``limit`` dead letters of ``queue``, without removing them.

        ``ids`` keeps only those whose :attr:`DeadLetterRecord.transport_id` it holds (unknown
        ids match nothing; ``limit`` counts those kept); None means all. A transport that cannot select by id raises
        ``ConfigurationError`` rather than return the others.
        """

    @abc.abstractmethod
    def requeue_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Move dead letters back to the subscriptions they came from; returns how many.

        ``ids`` as for :meth:`dead_letters`; a transport that cannot select by id raises
        ``ConfigurationError``, never requeues all of them instead.
        """

    def purge_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Delete dead letters for good (all, up to ``limit``, or those ``ids`` names); returns how many.

        Raises ``ConfigurationError`` on a transport that cannot purge.
        """
        raise ConfigurationError(f"the {self.scheme} transport cannot purge dead letters")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free connections and flush anything buffered."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"
