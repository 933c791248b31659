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

A message whose own ``hedwig_attempts`` or ``hedwig_not_before`` is not a whole number comes
back as a delivery with a ``fault`` (attempt 1 where the count cannot be read), never an error.

Why unary pull and not the client's streaming pull: the Pub/Sub emulator ignores a streaming
pull's ``max_outstanding_messages`` and pushes up to about a hundred messages per response, which
the client library then leases and keeps extending while they wait on hold; a pull asks for
exactly the free slots, so nothing is hoarded, on the emulator and on Pub/Sub alike.

Modules: this one holds the transport (publishing, and the doors to the rest);
``_gcp_consumer`` the consumer; ``_gcp_admin`` provisioning and dead letters; ``_gcp_common``
the constants, error boundary and checks they share.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.api_core.retry import Retry, if_exception_type
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher import PublisherClient as GapicPublisher
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber import SubscriberClient as GapicSubscriber
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from hedwig_tasks.exceptions import ConfigurationError, PublishError
from hedwig_tasks.transports._gcp_admin import (
    _dlq_modack,
    _Provisioner,
    _read_dead_letters,
    _requeue,
)
from hedwig_tasks.transports._gcp_common import (
    _RETRYABLE,
    ATTEMPTS_ATTRIBUTE,
    CALL_TIMEOUT_S,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_DELIVERY_ATTEMPTS,
    DEFAULT_PUBLISH_TIMEOUT_S,
    MAX_ACK_DEADLINE_S,
    MAX_ATTRIBUTES,
    MAX_BATCH,
    NOT_BEFORE_ATTRIBUTE,
    _boundary,
    _check_message,
    _number,
    _options,
)
from hedwig_tasks.transports._gcp_consumer import PubSubConsumer
from hedwig_tasks.transports.base import (
    Capabilities,
    DeadLetterRecord,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = ["ATTEMPTS_ATTRIBUTE", "NOT_BEFORE_ATTRIBUTE", "GooglePubSubTransport", "PubSubConsumer"]


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
