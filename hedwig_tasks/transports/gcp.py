"""Google Pub/Sub transport (google-cloud-pubsub), wire-compatible with authedwig's GCP backends.

Features: publishing one message synchronously (one ``Publish`` call, without the batching
client's per-message latency) or many through the batching client with futures, with the size
and attribute limits checked before sending; consuming every subscription of an app with pulls
that never lease more than the worker can hold; leases kept with ``ModifyAckDeadline``; delayed
retries as ack deadlines (up to 600 s) or, for longer delays, by republishing to the app's own
topic with a not-before time that consumers honour without holding the message; delayed
publishes with the same not-before time (Pub/Sub has no delay of its own); dead letters
published with their reason to the app's DLQ topic, with the subscriptions' dead-letter policy
as a safety net; provisioning, dead-letter listing and requeue.

Names (as authedwig's): topic ``t`` is ``projects/<project>/topics/hedwig-t``; the app ``q``
subscribes with ``hedwig-q-t`` (``hedwig-q-<project>-t`` for a topic of another project) and
also consumes ``hedwig-q`` on its own topic ``hedwig-q``, where requeued and long-delayed
messages go; dead letters live in topic and subscription ``hedwig-q-dlq``.

Connection string: ``gcp://PROJECT`` plus options, e.g.
``gcp://hedwig-dev?emulator=127.0.0.1:8085&lease_s=30``. Credentials come from
``credentials_file`` (a constructor argument, or Hedwig's ``GOOGLE_APPLICATION_CREDENTIALS``)
or Google's default chain, never from the URL. With an emulator (the ``emulator`` option, else
``$PUBSUB_EMULATOR_HOST`` read at first use) no credentials are used.

Options (query string): ``emulator`` (host:port), ``lease_s`` (ack deadline a receive takes and
each extension asks for; default 30), ``max_delivery_attempts`` (the dead-letter policy's
safety net; default 20), ``publish_timeout_s`` (longest a publish keeps retrying; default 30),
``batch_max_messages``, ``batch_max_bytes``, ``batch_max_latency_s`` (the batching publisher's
knobs, Hedwig's ``HEDWIG_PUBLISHER_GCP_BATCH_SETTINGS``), ``retry_min_backoff_s`` and
``retry_max_backoff_s`` (a retry policy that provision writes on the subscriptions, delaying
redelivery after a nack or an expired lease; off by default, since it also delays the messages
a stopping worker gives back). An unknown option raises ``ConfigurationError``.

A message whose own ``hedwig_attempts`` or ``hedwig_not_before`` is not a whole number comes
back as a delivery with a ``fault`` (attempt 1 where the count cannot be read), never an error.

Why unary pull and not the client's streaming pull: the Pub/Sub emulator ignores a streaming
pull's ``max_outstanding_messages`` and pushes up to about a hundred messages per response, which
the client library then leases and keeps extending while they wait on hold; a pull asks for
exactly the free slots, so nothing is hoarded, on the emulator and on Pub/Sub alike.

Modules: this one holds the transport (its options, publishing, and the doors to the rest);
``_gcp_client`` the Pub/Sub client the others share (Google's clients made on first use, names,
the calls, the error boundary); ``_gcp_consumer`` the consumer; ``_gcp_admin`` provisioning and
dead letters; ``_gcp_wire`` the attributes this transport adds and Pub/Sub's message limits.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from hedwig_tasks.exceptions import ConfigurationError, PublishError
from hedwig_tasks.transports._gcp_admin import UNCOUNTED, DeadLetterQueue, Provisioner, describe_subscription
from hedwig_tasks.transports._gcp_client import CALL_TIMEOUT_S, MAX_ACK_DEADLINE_S, MAX_BATCH, PubSubClient
from hedwig_tasks.transports._gcp_consumer import PubSubConsumer
from hedwig_tasks.transports._gcp_wire import (
    ATTEMPTS_ATTRIBUTE,
    MAX_ATTRIBUTES,
    NOT_BEFORE_ATTRIBUTE,
    check_message,
    delayed,
)
from hedwig_tasks.transports._url import Option, count, read_options, seconds, text
from hedwig_tasks.transports.base import (
    Capabilities,
    DeadLetterRecord,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = ["ATTEMPTS_ATTRIBUTE", "NOT_BEFORE_ATTRIBUTE", "GooglePubSubTransport", "PubSubConsumer"]

#: Ack deadline a receive takes and each lease extension asks for, in seconds.
DEFAULT_LEASE_S = 30.0
#: Deliveries after which the subscription's dead-letter policy moves a message (the safety net).
DEFAULT_MAX_DELIVERY_ATTEMPTS = 20
#: Longest a publish keeps retrying an unavailable service before it raises, in seconds.
DEFAULT_PUBLISH_TIMEOUT_S = 30.0


def _seconds_or_zero(value: str) -> float:
    """0, or a positive and finite number of seconds (no backoff or batching latency is meaningful)."""
    try:
        return 0.0 if float(value) == 0 else seconds(value)
    except ValueError:
        raise ValueError("must be 0 or a positive number of seconds") from None


#: The URL's options (see the module docstring) and how each is read.
_OPTIONS: dict[str, Option] = {
    "emulator": text,
    "lease_s": seconds,
    "max_delivery_attempts": count,
    "publish_timeout_s": seconds,
    "batch_max_messages": count,
    "batch_max_bytes": count,
    "batch_max_latency_s": _seconds_or_zero,
    "retry_min_backoff_s": _seconds_or_zero,
    "retry_max_backoff_s": _seconds_or_zero,
}


# -- the transport ----------------------------------------------------------------------------


class GooglePubSubTransport(Transport):
    """Topics and subscriptions of one Google Cloud project; clients are made on first use."""

    scheme = "gcp"
    messaging_system = "gcp_pubsub"
    capabilities = Capabilities(
        text_only=False,
        max_delay_s=None,  # past 600 s, retries are republished with a not-before time
        max_lease_s=float(MAX_ACK_DEADLINE_S),
        max_receive_batch=MAX_BATCH,
        max_attributes=MAX_ATTRIBUTES,
        status_counts=False,  # Pub/Sub's API has no counts (they are Cloud Monitoring metrics)
        delayed_publish=True,  # a not-before time the consumer honours, held by ack deadlines
    )

    def __init__(
        self,
        project: str | None = None,
        *,
        credentials_file: str | None = None,
        emulator: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        max_delivery_attempts: int = DEFAULT_MAX_DELIVERY_ATTEMPTS,
        publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S,
        batch_max_messages: int = 100,
        batch_max_bytes: int = 1_000_000,
        batch_max_latency_s: float = 0.01,
        subscriptions: Sequence[tuple[str, str]] = (),
        retry_min_backoff_s: float | None = None,
        retry_max_backoff_s: float = 600.0,
    ) -> None:
        if not 0 < lease_s <= MAX_ACK_DEADLINE_S:
            raise ConfigurationError(f"lease_s must be more than 0 and at most {MAX_ACK_DEADLINE_S}, got {lease_s!r}")
        if not 5 <= max_delivery_attempts <= 100:
            raise ConfigurationError(
                f"max_delivery_attempts must be 5 to 100 (Pub/Sub's range), got {max_delivery_attempts!r}"
            )
        if publish_timeout_s <= 0:
            raise ConfigurationError(f"publish_timeout_s must be more than 0, got {publish_timeout_s!r}")
        self.lease_s = float(lease_s)
        self.max_delivery_attempts = int(max_delivery_attempts)
        self.retry_backoff_s = None if retry_min_backoff_s is None else (retry_min_backoff_s, retry_max_backoff_s)
        #: Google's clients, the names and the calls; shared with consumers and provisioning.
        self.client = PubSubClient(
            project,
            credentials_file=credentials_file,
            emulator=emulator,
            publish_timeout_s=publish_timeout_s,
            batch_max_messages=batch_max_messages,
            batch_max_bytes=batch_max_bytes,
            batch_max_latency_s=batch_max_latency_s,
            foreign={topic: owner for topic, owner in subscriptions},
        )

    @classmethod
    def from_url(cls, url: str) -> GooglePubSubTransport:
        """``gcp://PROJECT?option=...``; see the module docstring for the options."""
        parts = urlsplit(url)
        if parts.scheme != "gcp" or parts.path not in ("", "/"):
            raise ConfigurationError(f"expected gcp://PROJECT?option=..., got {url!r}")
        options, _ = read_options("gcp", parts.query, _OPTIONS)
        return cls(parts.netloc or None, **options)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> GooglePubSubTransport:
        """Build from Hedwig's settings: ``GOOGLE_CLOUD_PROJECT``, ``GOOGLE_APPLICATION_CREDENTIALS``,
        ``HEDWIG_SUBSCRIPTIONS`` (its ``(topic, project)`` items) and ``PUBSUB_EMULATOR_HOST``.

        ``settings`` is anything indexed by setting name: a dict, or ``HedwigSettings``.
        """

        def get(name: str) -> Any:
            try:
                return settings[name]
            except KeyError:
                return None

        subscriptions = [tuple(s) for s in (get("HEDWIG_SUBSCRIPTIONS") or []) if not isinstance(s, str)]
        given: dict[str, Any] = {
            "project": get("GOOGLE_CLOUD_PROJECT"),
            "credentials_file": get("GOOGLE_APPLICATION_CREDENTIALS"),
            "emulator": get("PUBSUB_EMULATOR_HOST"),
            "subscriptions": subscriptions,
            "lease_s": get("HEDWIG_VISIBILITY_TIMEOUT_S"),
        }
        return cls(**{**{k: v for k, v in given.items() if v}, **overrides})

    def __repr__(self) -> str:
        shown = f" emulator={self.emulator!r}" if self.emulator else ""
        return f"<GooglePubSubTransport project={self.project!r}{shown}>"

    # -- settings held by the client, and names -----------------------------------------------

    @property
    def project(self) -> str | None:
        """The Google Cloud project; None until Google's default credentials tell it, if not given."""
        return self.client.project

    @property
    def emulator(self) -> str | None:
        """``host:port`` of the Pub/Sub emulator in use (``$PUBSUB_EMULATOR_HOST`` once read), or None."""
        return self.client.emulator

    @property
    def publish_timeout_s(self) -> float:
        """Longest a publish keeps retrying an unavailable service, in seconds."""
        return self.client.publish_timeout_s

    @property
    def batch_settings(self) -> Any:
        """The batching publisher's ``BatchSettings``."""
        return self.client.batch_settings

    @property
    def foreign(self) -> Mapping[str, str]:
        """Subscribed topics of other projects: topic -> the project that owns it."""
        return self.client.foreign

    def topic_path(self, topic: str, owner: str | None = None) -> str:
        """``projects/<owner or ours>/topics/hedwig-<topic>``."""
        return self.client.topic_path(topic, owner)

    def subscription_name(self, queue: str, topic: str | None = None) -> str:
        """``hedwig-<queue>-<topic>``, ``hedwig-<queue>-<project>-<topic>`` for another project's
        topic, or the app's own ``hedwig-<queue>`` when ``topic`` is None."""
        return self.client.subscription_name(queue, topic)

    def subscription_path(self, name: str) -> str:
        """``projects/<ours>/subscriptions/<name>``."""
        return self.client.subscription_path(name)

    def dlq_name(self, queue: str) -> str:
        """``hedwig-<queue>-dlq``: the dead letters' topic and subscription."""
        return self.client.dlq_name(queue)

    # -- publishing ---------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        body: bytes,
        attributes: Mapping[str, str],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> str:
        """One ``Publish`` call to ``hedwig-<topic>``; returns Pub/Sub's message id.

        Retries an unavailable service for up to ``publish_timeout_s``, then raises ``PublishError``.
        A delay rides in ``hedwig_not_before`` (see :func:`~hedwig_tasks.transports._gcp_wire.delayed`).
        """
        attributes = delayed(attributes, delay_s)
        check_message(topic, body, attributes)
        return self.client.publish(self.topic_path(topic, owner), [(bytes(body), dict(attributes))], topic=topic)[0]

    def publish_async(
        self, topic: str, body: bytes, attributes: Mapping[str, str], *, owner: str | None = None
    ) -> concurrent.futures.Future[str]:
        """Queue one message on the batching publisher (Hedwig's async publisher); a future of its id.

        The limits are checked now (``PublishError``); a send that fails sets the future's exception
        to ``PublishError``.
        """
        check_message(topic, body, attributes)
        return self.client.publish_batched(self.topic_path(topic, owner), bytes(body), attributes, topic=topic)

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> list[str]:
        """Every message through the batching publisher, then wait for all; ids in order.

        Every message is checked before any is sent. Raises ``PublishError`` naming how many
        of them were sent.
        """
        messages = [(body, delayed(attributes, delay_s)) for body, attributes in messages]
        for body, attributes in messages:
            check_message(topic, body, attributes)
        futures = [self.publish_async(topic, body, attributes, owner=owner) for body, attributes in messages]
        ids, failure = [], None
        for future in futures:
            try:
                ids.append(future.result(timeout=self.publish_timeout_s + CALL_TIMEOUT_S))
            except (PublishError, concurrent.futures.TimeoutError) as exc:
                failure = failure or exc
        if failure is not None:
            raise PublishError(f"{failure} ({len(ids)} of {len(futures)} messages were sent)") from failure
        return ids

    # -- consuming and administration ---------------------------------------------------------

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> PubSubConsumer:
        """A consumer of ``hedwig-<queue>-<topic>`` for each topic, and of the app's own ``hedwig-<queue>``.

        It never leases more than each receive asks for; the worker asks for its free slots.
        """
        names = [self.subscription_name(queue, topic) for topic in topics] + [self.subscription_name(queue)]
        return PubSubConsumer(
            self.client,
            queue,
            list(dict.fromkeys(names)),
            lease_s=self.lease_s,
            max_delivery_attempts=self.max_delivery_attempts,
        )

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Topics, the app's own topic and subscription, subscriptions with dead-letter and retry
        policies, the DLQ topic and its subscription; idempotent."""
        provisioner = Provisioner(
            self.client,
            lease_s=self.lease_s,
            max_delivery_attempts=self.max_delivery_attempts,
            retry_backoff_s=self.retry_backoff_s,
            dry_run=dry_run,
        )
        return provisioner.run(queue, subscribe, publish)

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """A row per subscription, with what Pub/Sub's API tells of it (its dead-letter topic and
        policy, ack deadline, retention); a missing subscription raises ``TransportError``.

        The counts are None: Pub/Sub reports backlog only as Cloud Monitoring metrics.
        """
        return [
            SubscriptionStatus(
                name,
                topic,
                None,
                None,
                None,
                details=describe_subscription(self.client, name),
                unknown_because=UNCOUNTED,
            )
            for topic, name in ((topic, self.subscription_name(queue, topic)) for topic in topics)
        ]

    def dead_letters(
        self, queue: str, *, limit: int = 100, ids: Collection[str] | None = None
    ) -> list[DeadLetterRecord]:
        """Up to ``limit`` messages of ``hedwig-<queue>-dlq`` (their message ids in ``ids``, if
        given), read and given back at once."""
        return DeadLetterQueue(self.client, queue).read(limit, ids)

    def requeue_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Republish dead letters to the app's own topic ``hedwig-<queue>`` (as authedwig does), as
        they were before they died, then acknowledge them in the DLQ; returns how many moved."""
        return DeadLetterQueue(self.client, queue).requeue(limit, progress, ids)

    def purge_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Acknowledge dead letters in ``hedwig-<queue>-dlq``, deleting them; returns how many."""
        return DeadLetterQueue(self.client, queue).purge(limit, progress, ids)

    def close(self) -> None:
        """Flush the batching publisher and close Google's clients (made again if used after)."""
        self.client.close()
