"""Google Pub/Sub transport (google-cloud-pubsub), wire-compatible with authedwig's GCP backends.

Features: publishing one message synchronously (one ``Publish`` call, without the batching
client's per-message latency) or many through the batching client with futures, with the size
and attribute limits checked before sending; consuming every subscription of an app with pulls
that never lease more than the worker can hold; leases kept with ``ModifyAckDeadline``; delayed
retries as ack deadlines (up to 600 s) or, for longer delays, by republishing to the app's own
topic with a not-before time that consumers honour without holding the message; dead letters
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

Why unary pull and not the client's streaming pull: the Pub/Sub emulator ignores a streaming
pull's ``max_outstanding_messages`` and pushes up to about a hundred messages per response, which
the client library then leases and keeps extending while they wait on hold; a pull asks for
exactly the free slots, so nothing is hoarded, on the emulator and on Pub/Sub alike.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from google.api_core import exceptions as google_exceptions
from google.api_core.retry import Retry, if_exception_type
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher import PublisherClient as GapicPublisher
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber import SubscriberClient as GapicSubscriber
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.transports.base import (
    Capabilities,
    Consumer,
    DeadLetterRecord,
    Delivery,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = ["GooglePubSubTransport", "PubSubConsumer"]

logger = logging.getLogger(__name__)

#: Ack deadline a receive takes and each lease extension asks for, in seconds.
DEFAULT_LEASE_S = 30.0
#: Deliveries after which the subscription's dead-letter policy moves a message (the safety net).
DEFAULT_MAX_DELIVERY_ATTEMPTS = 20
#: Longest a publish keeps retrying an unavailable service before it raises, in seconds.
DEFAULT_PUBLISH_TIMEOUT_S = 30.0
#: Longest one administrative call may take, in seconds.
CALL_TIMEOUT_S = 10.0
#: Longest one pull waits for messages, in seconds.
MAX_LONG_POLL_S = 10.0
#: A pull's deadline beyond its wait: Pub/Sub answers an empty pull about a second before it.
PULL_DEADLINE_MARGIN_S = 0.95
#: How long a dead-letter read waits for more before it believes there are none, in seconds.
DLQ_WAIT_S = 0.5
#: Longest pause between quick polls of several subscriptions, in seconds.
MAX_POLL_PAUSE_S = 0.2
#: Longest ack deadline Pub/Sub takes in one call, in seconds.
MAX_ACK_DEADLINE_S = 600
#: Shortest ack deadline a subscription can have, in seconds.
MIN_SUBSCRIPTION_DEADLINE_S = 10
#: Largest Pub/Sub message (data plus attributes), in bytes.
MAX_MESSAGE_BYTES = 10_000_000
#: Most attributes on one message.
MAX_ATTRIBUTES = 100
#: Longest attribute key and value, in bytes.
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
#: Most messages one Publish or Pull call carries.
MAX_BATCH = 1000
#: Retention of the dead-letter subscription, in seconds (the Pub/Sub maximum, 7 days).
DLQ_RETENTION_S = 604800

#: Attributes this transport adds; none of them is a Hedwig header (the ``hedwig_`` prefix).
NOT_BEFORE_ATTRIBUTE = "hedwig_not_before"  #: epoch ms before which a republished retry waits
ATTEMPTS_ATTRIBUTE = "hedwig_attempts"  #: attempts made before a republished retry
REASON_ATTRIBUTE = "hedwig_dead_letter_reason"
SOURCE_ATTRIBUTE = "hedwig_dead_letter_subscription"
DEAD_ATTEMPTS_ATTRIBUTE = "hedwig_dead_letter_attempts"
DEAD_AT_ATTRIBUTE = "hedwig_dead_letter_at"  #: epoch ms
_OURS = frozenset(
    {
        NOT_BEFORE_ATTRIBUTE,
        ATTEMPTS_ATTRIBUTE,
        REASON_ATTRIBUTE,
        SOURCE_ATTRIBUTE,
        DEAD_ATTEMPTS_ATTRIBUTE,
        DEAD_AT_ATTRIBUTE,
    }
)
#: Attributes Pub/Sub adds when its dead-letter policy forwards a message.
_GOOGLE_DEAD_PREFIX = "CloudPubSubDeadLetter"

_URL_OPTIONS = (
    "retry_min_backoff_s",
    "retry_max_backoff_s",
    "batch_max_bytes",
    "batch_max_latency_s",
    "batch_max_messages",
    "emulator",
    "lease_s",
    "max_delivery_attempts",
    "publish_timeout_s",
)
_RETRYABLE = (
    google_exceptions.ServiceUnavailable,
    google_exceptions.DeadlineExceeded,
    google_exceptions.InternalServerError,
    google_exceptions.Aborted,
    google_exceptions.ResourceExhausted,
    google_exceptions.Unknown,
)


# -- boundary and helpers ---------------------------------------------------------------------


@contextlib.contextmanager
def _boundary(doing: str, error: type[TransportError] = TransportError) -> Iterator[None]:
    """Turn google.api_core's errors into ours: the transport boundary."""
    try:
        yield
    except google_exceptions.NotFound as exc:
        raise error(f"{doing} failed: not found ({exc.message}); run `hedwig-tasks provision`") from exc
    except google_exceptions.RetryError as exc:
        cause = exc.cause if exc.cause is not None else exc
        raise error(f"{doing} failed: gave up retrying: {cause}") from exc
    except google_exceptions.GoogleAPIError as exc:
        hint = " (is the Pub/Sub emulator or service reachable?)" if isinstance(exc, _RETRYABLE) else ""
        raise error(f"{doing} failed: {exc}{hint}") from exc
    except (grpc.RpcError, OSError) as exc:
        raise error(f"{doing} failed: {exc}") from exc


def _check_message(topic: str, body: bytes, attributes: Mapping[str, str]) -> None:
    """Raise ``PublishError`` for what Pub/Sub would refuse, before anything is sent."""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise PublishError(f"publish to {topic!r}: the body must be bytes, got {type(body).__name__}")
    if len(attributes) > MAX_ATTRIBUTES:
        raise PublishError(
            f"publish to {topic!r}: {len(attributes)} attributes; Pub/Sub takes at most {MAX_ATTRIBUTES}"
        )
    size = len(body)
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise PublishError(f"publish to {topic!r}: attribute {key!r} must be a string with a string value")
        key_bytes, value_bytes = len(key.encode()), len(value.encode())
        if not key or key_bytes > MAX_ATTRIBUTE_KEY_BYTES or key.startswith("goog"):
            raise PublishError(f"publish to {topic!r}: attribute name {key!r} is empty, too long or reserved")
        if value_bytes > MAX_ATTRIBUTE_VALUE_BYTES:
            raise PublishError(
                f"publish to {topic!r}: attribute {key!r} is {value_bytes} bytes; "
                f"Pub/Sub takes at most {MAX_ATTRIBUTE_VALUE_BYTES}"
            )
        size += key_bytes + value_bytes
    if size > MAX_MESSAGE_BYTES:
        raise PublishError(f"publish to {topic!r}: message is {size} bytes; Pub/Sub takes at most {MAX_MESSAGE_BYTES}")
    if not body and not attributes:
        raise PublishError(f"publish to {topic!r}: Pub/Sub refuses a message with neither data nor attributes")


def _options(query: str) -> dict[str, str]:
    given = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(given) - set(_URL_OPTIONS))
    if unknown:
        raise ConfigurationError(f"unknown gcp option(s) {', '.join(unknown)} (known: {', '.join(_URL_OPTIONS)})")
    return {name: values[-1] for name, values in given.items()}


def _number(name: str, value: Any, cast: Callable[[Any], float]) -> Any:
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"gcp option {name}={value!r} must be a number") from None


def _short(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _epoch_ms() -> int:
    return int(time.time() * 1000)


def _clean(attributes: Mapping[str, str]) -> dict[str, str]:
    """The message's own attributes, without what this transport or Pub/Sub's DLQ added."""
    return {k: v for k, v in attributes.items() if k not in _OURS and not k.startswith(_GOOGLE_DEAD_PREFIX)}


@dataclasses.dataclass(eq=False)
class _Receipt:
    """One delivery of one message: its ack id, and whether it may still settle anything."""

    ack_id: str
    subscription: str  # full path
    message_id: str
    republished: bool  # carries hedwig_attempts: a retry that went through the app's own topic
    settled: bool = False


# -- the transport ----------------------------------------------------------------------------


class GooglePubSubTransport(Transport):
    """Topics and subscriptions of one Google Cloud project; clients are made on first use."""

    scheme = "gcp"
    capabilities = Capabilities(
        text_only=False,
        max_delay_s=None,  # past 600 s, retries are republished with a not-before time
        max_lease_s=float(MAX_ACK_DEADLINE_S),
        max_receive_batch=MAX_BATCH,
        max_publish_batch=MAX_BATCH,
        max_attributes=MAX_ATTRIBUTES,
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
        self.project = project
        self.emulator = emulator
        self.lease_s = float(lease_s)
        self.max_delivery_attempts = int(max_delivery_attempts)
        self.publish_timeout_s = float(publish_timeout_s)
        self.batch_settings = pubsub_v1.types.BatchSettings(
            max_bytes=int(batch_max_bytes), max_latency=float(batch_max_latency_s), max_messages=int(batch_max_messages)
        )
        self.retry_backoff_s = None if retry_min_backoff_s is None else (retry_min_backoff_s, retry_max_backoff_s)
        self.foreign = {topic: owner for topic, owner in subscriptions}  #: subscribed topics of other projects
        self._credentials_file = credentials_file
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}

    @classmethod
    def from_url(cls, url: str) -> GooglePubSubTransport:
        """``gcp://PROJECT?option=...``; see the module docstring for the options."""
        parts = urlsplit(url)
        if parts.scheme != "gcp" or parts.path not in ("", "/"):
            raise ConfigurationError(f"expected gcp://PROJECT?option=..., got {url!r}")
        options: dict[str, Any] = {k: v for k, v in _options(parts.query).items() if v}
        for name in (
            "lease_s",
            "publish_timeout_s",
            "batch_max_latency_s",
            "retry_min_backoff_s",
            "retry_max_backoff_s",
        ):
            if name in options:
                options[name] = _number(name, options[name], float)
        for name in ("max_delivery_attempts", "batch_max_messages", "batch_max_bytes"):
            if name in options:
                options[name] = int(_number(name, options[name], int))
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

    # -- clients and names --------------------------------------------------------------------

    def _client(self, kind: str) -> Any:
        client = self._clients.get(kind)
        if client is None:
            with self._lock:
                client = self._clients.get(kind)
                if client is None:
                    client = self._clients[kind] = self._make_client(kind)
        return client

    def _make_client(self, kind: str) -> Any:
        emulator = self.emulator or os.environ.get("PUBSUB_EMULATOR_HOST")
        options: dict[str, Any] = {}
        if emulator:
            self.emulator = emulator
            channel = grpc.insecure_channel(emulator)
            transport_class = SubscriberGrpcTransport if kind == "subscriber" else PublisherGrpcTransport
            options["transport"] = transport_class(channel=channel)
        else:
            options["credentials"] = self._credentials()
        if kind == "batcher":
            return pubsub_v1.PublisherClient(batch_settings=self.batch_settings, **options)
        return GapicSubscriber(**options) if kind == "subscriber" else GapicPublisher(**options)

    def _credentials(self) -> Any:
        if self._credentials_file:
            from google.oauth2 import service_account

            try:
                return service_account.Credentials.from_service_account_file(
                    self._credentials_file, scopes=["https://www.googleapis.com/auth/pubsub"]
                )
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"GOOGLE_APPLICATION_CREDENTIALS: cannot read the key file: {exc}") from None
        import google.auth

        try:
            credentials, found_project = google.auth.default(scopes=["https://www.googleapis.com/auth/pubsub"])
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise ConfigurationError(f"no Google credentials: {exc}") from None
        self.project = self.project or found_project
        return credentials

    def _project(self) -> str:
        if not self.project:
            if not (self.emulator or os.environ.get("PUBSUB_EMULATOR_HOST")):
                self._client("publisher")  # google.auth.default() may know the project
            if not self.project:
                raise ConfigurationError("no Google Cloud project: use gcp://PROJECT or set GOOGLE_CLOUD_PROJECT")
        return self.project

    def topic_path(self, topic: str, owner: str | None = None) -> str:
        """``projects/<owner or ours>/topics/hedwig-<topic>``."""
        return f"projects/{owner or self._project()}/topics/hedwig-{topic}"

    def subscription_name(self, queue: str, topic: str | None = None) -> str:
        """``hedwig-<queue>-<topic>``, ``hedwig-<queue>-<project>-<topic>`` for another project's
        topic, or the app's own ``hedwig-<queue>`` when ``topic`` is None."""
        if topic is None:
            return f"hedwig-{queue}"
        owner = self.foreign.get(topic)
        return f"hedwig-{queue}-{owner}-{topic}" if owner else f"hedwig-{queue}-{topic}"

    def subscription_path(self, name: str) -> str:
        return f"projects/{self._project()}/subscriptions/{name}"

    def dlq_name(self, queue: str) -> str:
        return f"hedwig-{queue}-dlq"

    def _retry(self, deadline_s: float) -> Retry:
        return Retry(predicate=if_exception_type(*_RETRYABLE), initial=0.1, maximum=2.0, timeout=deadline_s)

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, topic: str, body: bytes, attributes: Mapping[str, str], *, owner: str | None = None) -> str:
        """One ``Publish`` call to ``hedwig-<topic>``; returns Pub/Sub's message id.

        Retries an unavailable service for up to ``publish_timeout_s``, then raises ``PublishError``.
        """
        _check_message(topic, body, attributes)
        return self._publish_now(self.topic_path(topic, owner), [(bytes(body), dict(attributes))], topic)[0]

    def _publish_now(self, path: str, messages: list[tuple[bytes, dict[str, str]]], topic: str) -> list[str]:
        request = {"topic": path, "messages": [{"data": body, "attributes": attrs} for body, attrs in messages]}
        with _boundary(f"publish to {topic!r} ({path})", PublishError):
            sent = self._client("publisher").publish(
                request=request, retry=self._retry(self.publish_timeout_s), timeout=self.publish_timeout_s
            )
        return list(sent.message_ids)

    def publish_async(
        self, topic: str, body: bytes, attributes: Mapping[str, str], *, owner: str | None = None
    ) -> concurrent.futures.Future[str]:
        """Queue one message on the batching publisher (Hedwig's async publisher); a future of its id.

        The limits are checked now (``PublishError``); a send that fails sets the future's exception
        to ``PublishError``.
        """
        _check_message(topic, body, attributes)
        path = self.topic_path(topic, owner)
        result: concurrent.futures.Future[str] = concurrent.futures.Future()
        with _boundary(f"publish to {topic!r} ({path})", PublishError):
            inner = self._client("batcher").publish(
                path,
                bytes(body),
                retry=self._retry(self.publish_timeout_s),
                timeout=self.publish_timeout_s,
                **attributes,
            )

        def done(future: Any) -> None:
            try:
                with _boundary(f"publish to {topic!r} ({path})", PublishError):
                    result.set_result(str(future.result()))
            except PublishError as exc:
                result.set_exception(exc)

        inner.add_done_callback(done)
        return result

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
    ) -> list[str]:
        """Every message through the batching publisher, then wait for all; ids in order.

        Every message is checked before any is sent. Raises ``PublishError`` naming how many
        of them were sent.
        """
        for body, attributes in messages:
            _check_message(topic, body, attributes)
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

    # -- administration -----------------------------------------------------------------------

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> PubSubConsumer:
        """A consumer of ``hedwig-<queue>-<topic>`` for each topic, and of the app's own ``hedwig-<queue>``.

        It never leases more than each receive asks for; the worker asks for its free slots.
        """
        names = [self.subscription_name(queue, topic) for topic in topics] + [self.subscription_name(queue)]
        return PubSubConsumer(self, queue, list(dict.fromkeys(names)))

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Topics, the app's own topic and subscription, subscriptions with dead-letter and retry
        policies, the DLQ topic and its subscription; idempotent."""
        return _Provisioner(self, dry_run).run(queue, subscribe, publish)

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """A row per subscription. Pub/Sub reports no counts through its API (they are Cloud
        Monitoring metrics), so depth, in flight and dead letters are None; a missing
        subscription raises ``TransportError``."""
        rows = []
        for topic in topics:
            name = self.subscription_name(queue, topic)
            with _boundary(f"reading subscription {name}"):
                self._client("subscriber").get_subscription(
                    subscription=self.subscription_path(name), timeout=CALL_TIMEOUT_S
                )
            rows.append(SubscriptionStatus(name, topic, None, None, None))
        return rows

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetterRecord]:
        """Up to ``limit`` messages of ``hedwig-<queue>-dlq``, read and given back at once."""
        records, ack_ids = _read_dead_letters(self, queue, limit)
        if ack_ids:
            _dlq_modack(self, queue, ack_ids, 0)
        return records

    def requeue_dead_letters(self, queue: str, *, limit: int | None = None, progress: Progress | None = None) -> int:
        """Republish dead letters to the app's own topic ``hedwig-<queue>`` (as authedwig does), as
        they were before they died, then acknowledge them in the DLQ; returns how many moved."""
        return _requeue(self, queue, limit, progress)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, {}
        batcher = clients.pop("batcher", None)
        if batcher is not None:
            with contextlib.suppress(Exception):
                batcher.stop()  # flushes what is batched
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.transport.close()


# -- consuming --------------------------------------------------------------------------------


class PubSubConsumer(Consumer):
    """Pulls some subscriptions of one app: exactly as many messages as asked, never more."""

    def __init__(self, transport: GooglePubSubTransport, queue: str, names: list[str]) -> None:
        self._transport = transport
        self._queue = queue
        self._names = names
        self._lock = threading.Lock()
        self._current: dict[tuple[str, str], _Receipt] = {}  # (subscription, message id) -> latest receipt
        self._counts: dict[tuple[str, str], int] = {}  # receives seen, for subscriptions without a DLQ policy
        self._next = 0

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Pull up to ``max_messages``, waiting up to about ``wait_s`` for the first.

        One subscription is long-polled; several are polled in turn, quickly and then again
        after short pauses, so a message on any of them is seen within a fifth of a second.
        Raises ``TransportError``, naming a missing subscription.
        """
        deadline = time.monotonic() + wait_s
        pause_s = 0.02
        while True:
            remaining = deadline - time.monotonic()
            if len(self._names) == 1:
                found = self._pull(self._names[0], max_messages, max(0.0, remaining))
            else:
                found = self._pull_all(max_messages)
            remaining = deadline - time.monotonic()
            if found or remaining <= 0:
                return found
            if len(self._names) > 1:
                time.sleep(min(pause_s, remaining))
                pause_s = min(pause_s * 2, MAX_POLL_PAUSE_S)

    def _pull_all(self, max_messages: int) -> list[Delivery]:
        """Quick pulls of each subscription in turn (starting with a different one each time),
        each asking for what the ones before did not bring."""
        with self._lock:
            start, self._next = self._next, self._next + 1
        found: list[Delivery] = []
        for i in range(len(self._names)):
            if len(found) >= max_messages:
                break
            found += self._pull(self._names[(start + i) % len(self._names)], max_messages - len(found), 0.0)
        return found

    def _pull(self, name: str, max_messages: int, wait_s: float) -> list[Delivery]:
        transport = self._transport
        path = transport.subscription_path(name)
        # Pub/Sub answers an empty pull shortly before the call's deadline: the deadline is the wait.
        timeout_s = min(wait_s, MAX_LONG_POLL_S) + PULL_DEADLINE_MARGIN_S
        request = {"subscription": path, "max_messages": max(1, min(max_messages, MAX_BATCH))}
        try:
            with _boundary(f"pull from subscription {name}"):
                response = transport._client("subscriber").pull(request=request, timeout=timeout_s, retry=None)
        except TransportError as exc:
            if isinstance(exc.__cause__, google_exceptions.DeadlineExceeded):
                return []
            raise
        received = list(response.received_messages)
        if received and transport.lease_s < MIN_SUBSCRIPTION_DEADLINE_S:
            self._modack(path, [r.ack_id for r in received], transport.lease_s)
        deliveries = []
        for item in received:
            delivery = self._delivery(name, path, item)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    def _delivery(self, name: str, path: str, item: Any) -> Delivery | None:
        message = item.message
        attributes = dict(message.attributes)
        not_before = attributes.get(NOT_BEFORE_ATTRIBUTE)
        if not_before is not None and self._defer(path, item, int(not_before)):
            return None
        republished = ATTEMPTS_ATTRIBUTE in attributes
        key = (path, message.message_id)
        with self._lock:
            if republished:
                attempt = int(attributes[ATTEMPTS_ATTRIBUTE]) + 1
            elif item.delivery_attempt:
                attempt = int(item.delivery_attempt)
            else:
                attempt = self._counts[key] = self._counts.get(key, 0) + 1
            receipt = self._current[key] = _Receipt(item.ack_id, path, message.message_id, republished)
        return Delivery(bytes(message.data), _clean(attributes), attempt, receipt, name, message.message_id)

    def _defer(self, path: str, item: Any, not_before_ms: int) -> bool:
        """Keep a republished retry that is not due yet with the broker, not in memory."""
        remaining_s = (not_before_ms - _epoch_ms()) / 1000
        if remaining_s <= 0:
            return False
        near_limit = (item.delivery_attempt or 0) >= self._transport.max_delivery_attempts - 2
        if near_limit:  # every deferral counts as a delivery: start afresh before the DLQ policy acts
            message = item.message
            self._republish_own(self._queue, bytes(message.data), dict(message.attributes))
            self._call("ack", path, lambda: self._ack_ids(path, [item.ack_id]))
        else:
            self._modack(path, [item.ack_id], min(math.ceil(remaining_s), MAX_ACK_DEADLINE_S))
        return True

    # -- settling -----------------------------------------------------------------------------

    def _live(self, delivery: Delivery) -> _Receipt | None:
        receipt: _Receipt = delivery.receipt
        with self._lock:
            current = self._current.get((receipt.subscription, receipt.message_id))
            if current is not receipt or receipt.settled:
                return None
            return receipt

    def _settle(self, deliveries: Sequence[Delivery]) -> dict[str, list[_Receipt]]:
        """The live receipts among ``deliveries``, marked settled, by subscription path."""
        by_path: dict[str, list[_Receipt]] = {}
        with self._lock:
            for delivery in deliveries:
                receipt: _Receipt = delivery.receipt
                key = (receipt.subscription, receipt.message_id)
                if self._current.get(key) is receipt and not receipt.settled:
                    receipt.settled = True
                    del self._current[key]
                    self._counts.pop(key, None)
                    by_path.setdefault(receipt.subscription, []).append(receipt)
        return by_path

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        for path, receipts in self._settle(deliveries).items():
            self._ack_ids(path, [r.ack_id for r in receipts])

    def _ack_ids(self, path: str, ack_ids: list[str]) -> None:
        for start in range(0, len(ack_ids), MAX_BATCH):
            with _boundary(f"acknowledge on {_short(path)}"):
                self._transport._client("subscriber").acknowledge(
                    subscription=path, ack_ids=ack_ids[start : start + MAX_BATCH], timeout=CALL_TIMEOUT_S
                )

    def _modack(self, path: str, ack_ids: list[str], seconds: float) -> None:
        deadline = max(0, min(MAX_ACK_DEADLINE_S, math.ceil(seconds - 1e-9)))
        for start in range(0, len(ack_ids), MAX_BATCH):
            with _boundary(f"modify ack deadline on {_short(path)}"):
                self._transport._client("subscriber").modify_ack_deadline(
                    subscription=path,
                    ack_ids=ack_ids[start : start + MAX_BATCH],
                    ack_deadline_seconds=deadline,
                    timeout=CALL_TIMEOUT_S,
                )

    def _call(self, what: str, path: str, action: Callable[[], None]) -> None:
        try:
            action()
        except TransportError as exc:
            logger.warning("%s on %s failed: %s (the message will come back)", what, _short(path), exc)
            raise

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Nack: visible again at once (a delivery attempt, as every receive is)."""
        for path, receipts in self._settle(deliveries).items():
            self._modack(path, [r.ack_id for r in receipts], 0)

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        by_path: dict[str, list[str]] = {}
        for delivery in deliveries:
            receipt = self._live(delivery)
            if receipt is not None:
                by_path.setdefault(receipt.subscription, []).append(receipt.ack_id)
        for path, ack_ids in by_path.items():
            self._modack(path, ack_ids, min(lease_s, MAX_ACK_DEADLINE_S))

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        """Up to 600 s: the ack deadline (the broker redelivers; the attempt counts toward the
        dead-letter policy). Longer, or for a message already republished: republish to the app's
        own topic with a not-before time and the attempts so far, then acknowledge this copy."""
        receipt = self._live(delivery)
        if receipt is None:
            return
        if delay_s <= MAX_ACK_DEADLINE_S and not receipt.republished:
            if self._settle([delivery]):
                self._modack(receipt.subscription, [receipt.ack_id], delay_s)
            return
        attributes = {
            **delivery.attributes,
            NOT_BEFORE_ATTRIBUTE: str(_epoch_ms() + int(delay_s * 1000)),
            ATTEMPTS_ATTRIBUTE: str(delivery.attempt),
        }
        self._republish_own(self._queue, delivery.body, attributes)
        if self._settle([delivery]):
            self._ack_ids(receipt.subscription, [receipt.ack_id])

    def _republish_own(self, queue: str, body: bytes, attributes: dict[str, str]) -> None:
        transport = self._transport
        transport._publish_now(transport.topic_path(queue), [(body, attributes)], queue)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish it to ``hedwig-<queue>-dlq`` with the reason, then acknowledge it here."""
        receipt = self._live(delivery)
        if receipt is None:
            return
        reason_bytes = reason.encode()[:MAX_ATTRIBUTE_VALUE_BYTES]
        attributes = {
            **delivery.attributes,
            REASON_ATTRIBUTE: reason_bytes.decode("utf-8", "ignore"),
            SOURCE_ATTRIBUTE: delivery.subscription,
            DEAD_ATTEMPTS_ATTRIBUTE: str(delivery.attempt),
            DEAD_AT_ATTRIBUTE: str(_epoch_ms()),
        }
        transport = self._transport
        dlq = transport.dlq_name(self._queue)
        path = f"projects/{transport._project()}/topics/{dlq}"
        transport._publish_now(path, [(delivery.body, attributes)], dlq)
        if self._settle([delivery]):
            self._ack_ids(receipt.subscription, [receipt.ack_id])

    def close(self) -> None:
        """Nothing to free: the transport owns the clients. Unsettled deliveries come back when
        their ack deadline passes."""


# -- administration ---------------------------------------------------------------------------


class _Provisioner:
    """Creates what is missing, in dependency order, and says what it did (or would do)."""

    def __init__(self, transport: GooglePubSubTransport, dry_run: bool) -> None:
        self.transport = transport
        self.dry_run = dry_run
        self.actions: list[str] = []
        self.publisher = transport._client("publisher")
        self.subscriber = transport._client("subscriber")
        self._created: set[str] = set()

    def run(self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str]) -> list[str]:
        own_topics = [t for t in dict.fromkeys([*publish, *subscribe]) if t not in self.transport.foreign]
        for topic in own_topics:
            self.topic(topic, topic)
        if queue:
            self.topic(queue, f"{queue} (the app's own, for requeues and long retries)")
            self.topic(f"{queue}-dlq", f"{queue}-dlq (dead letters)")
            dlq = self.transport.topic_path(f"{queue}-dlq")
            for topic in dict.fromkeys(subscribe):
                owner = self.transport.foreign.get(topic)
                self.subscription(queue, topic, self.transport.topic_path(topic, owner), dlq)
            self.subscription(queue, None, self.transport.topic_path(queue), dlq)
            self.subscription(queue, "dlq", dlq, None)
        return self.actions

    def _exists(self, get: Callable[..., Any], **request: str) -> bool:
        try:
            with _boundary(f"reading {next(iter(request.values()))}"):
                get(**request, timeout=CALL_TIMEOUT_S)
        except TransportError as exc:
            if isinstance(exc.__cause__, google_exceptions.NotFound):
                return False
            raise
        return True

    def topic(self, topic: str, described: str) -> None:
        path = self.transport.topic_path(topic)
        if self._exists(self.publisher.get_topic, topic=path) or path in self._created:
            return
        self.actions.append(f"create topic {described}: {path}")
        self._created.add(path)
        if not self.dry_run:
            with contextlib.suppress(google_exceptions.AlreadyExists), _boundary(f"creating topic {path}"):
                self.publisher.create_topic(name=path, timeout=CALL_TIMEOUT_S)

    def subscription(self, queue: str, topic: str | None, topic_path: str, dlq: str | None) -> None:
        transport = self.transport
        if topic == "dlq":
            name = transport.dlq_name(queue)
        else:
            name = transport.subscription_name(queue, topic)
        path = transport.subscription_path(name)
        if self._exists(self.subscriber.get_subscription, subscription=path):
            return
        request: dict[str, Any] = {
            "name": path,
            "topic": topic_path,
            "ack_deadline_seconds": int(min(max(transport.lease_s, MIN_SUBSCRIPTION_DEADLINE_S), MAX_ACK_DEADLINE_S)),
        }
        if dlq is None:
            request["message_retention_duration"] = {"seconds": DLQ_RETENTION_S}
            self.actions.append(f"create subscription {name} to {_short(topic_path)} (dead letters of {queue})")
        else:
            request["dead_letter_policy"] = {
                "dead_letter_topic": dlq,
                "max_delivery_attempts": transport.max_delivery_attempts,
            }
            if transport.retry_backoff_s is not None:
                low, high = transport.retry_backoff_s
                request["retry_policy"] = {
                    "minimum_backoff": {"seconds": int(low)},
                    "maximum_backoff": {"seconds": int(high)},
                }
            what = topic if topic is not None else f"its own topic {_short(topic_path)}"
            self.actions.append(
                f"subscribe {queue} to {what}: {name} (dead letters after {transport.max_delivery_attempts} deliveries)"
            )
        if not self.dry_run:
            with contextlib.suppress(google_exceptions.AlreadyExists), _boundary(f"creating subscription {name}"):
                self.subscriber.create_subscription(request=request, timeout=CALL_TIMEOUT_S)


def _dlq_path(transport: GooglePubSubTransport, queue: str) -> str:
    return transport.subscription_path(transport.dlq_name(queue))


def _dlq_modack(transport: GooglePubSubTransport, queue: str, ack_ids: list[str], seconds: int) -> None:
    path = _dlq_path(transport, queue)
    for start in range(0, len(ack_ids), MAX_BATCH):
        with _boundary(f"giving back dead letters of {queue}"):
            transport._client("subscriber").modify_ack_deadline(
                subscription=path, ack_ids=ack_ids[start : start + MAX_BATCH], ack_deadline_seconds=seconds
            )


def _pull_dead(transport: GooglePubSubTransport, queue: str, limit: int, seen: set[str]) -> list[Any]:
    """Up to ``limit`` unseen messages of the DLQ subscription; [] once a pull brings nothing new."""
    path = _dlq_path(transport, queue)
    try:
        with _boundary(f"reading dead letters of {queue}"):
            response = transport._client("subscriber").pull(
                request={"subscription": path, "max_messages": max(1, min(limit, MAX_BATCH))},
                timeout=DLQ_WAIT_S + PULL_DEADLINE_MARGIN_S,
                retry=None,
            )
    except TransportError as exc:
        if isinstance(exc.__cause__, google_exceptions.DeadlineExceeded):
            return []
        raise
    fresh = [r for r in response.received_messages if r.message.message_id not in seen]
    repeated = [r.ack_id for r in response.received_messages if r.message.message_id in seen]
    if repeated:
        _dlq_modack(transport, queue, repeated, 0)
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
        attempts = int(attributes.get(DEAD_ATTEMPTS_ATTRIBUTE, "0") or 0)
        dead_at = int(attributes.get(DEAD_AT_ATTRIBUTE, "0") or 0) / 1000 or dead_at
    else:
        source = _short(attributes.get(f"{_GOOGLE_DEAD_PREFIX}SourceSubscription", ""))
        attempts = int(attributes.get(f"{_GOOGLE_DEAD_PREFIX}SourceDeliveryCount", "0") or 0)
        reason = f"Pub/Sub dead-letter policy: not acknowledged after {attempts} deliveries"
    return DeadLetterRecord(
        bytes(message.data), _clean(attributes), reason, source, attempts, dead_at, message.message_id
    )


def _read_dead_letters(
    transport: GooglePubSubTransport, queue: str, limit: int
) -> tuple[list[DeadLetterRecord], list[str]]:
    """Up to ``limit`` dead letters, oldest first, and the ack ids that now hold them."""
    items: list[Any] = []
    seen: set[str] = set()
    while len(items) < limit:
        fresh = _pull_dead(transport, queue, limit - len(items), seen)
        if not fresh:
            break
        items += fresh
    pairs = sorted(((_record(item), item.ack_id) for item in items), key=lambda pair: pair[0].dead_at)
    return [record for record, _ in pairs], [ack_id for _, ack_id in pairs]


def _requeue(transport: GooglePubSubTransport, queue: str, limit: int | None, progress: Progress | None) -> int:
    moved = 0
    seen: set[str] = set()
    own = transport.topic_path(queue)
    path = _dlq_path(transport, queue)
    while limit is None or moved < limit:
        batch = _pull_dead(transport, queue, MAX_BATCH if limit is None else limit - moved, seen)
        if not batch:
            break
        messages = [(bytes(item.message.data), _clean(item.message.attributes)) for item in batch]
        try:
            transport._publish_now(own, messages, queue)
        except PublishError:
            _dlq_modack(transport, queue, [item.ack_id for item in batch], 0)
            raise
        with _boundary(f"acknowledging requeued dead letters of {queue}"):
            transport._client("subscriber").acknowledge(subscription=path, ack_ids=[item.ack_id for item in batch])
        moved += len(batch)
        if progress:
            progress(moved, limit)
    return moved
