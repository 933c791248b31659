"""The Pub/Sub client that the transport, its consumer and its provisioning share.

It holds Google's publisher, batching publisher and subscriber clients, each made on first use
(on the emulator, or with credentials); the project and the names of topics and subscriptions;
the calls the rest make (publish, pull, acknowledge, modify ack deadline); Pub/Sub's limits on
those calls; and :func:`pubsub_errors`, the boundary where Google's errors become ours.
See ``gcp.py`` for the design.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.api_core import exceptions as google_exceptions
from google.api_core.retry import Retry, if_exception_type
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher import PublisherClient as GapicPublisher
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber import SubscriberClient as GapicSubscriber
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.transports._boundary import boundary

__all__ = [
    "CALL_TIMEOUT_S",
    "MAX_ACK_DEADLINE_S",
    "MAX_BATCH",
    "MIN_SUBSCRIPTION_DEADLINE_S",
    "PubSubClient",
    "pubsub_errors",
    "short",
]

#: Longest one administrative, acknowledge or ack-deadline call may take, in seconds.
CALL_TIMEOUT_S = 10.0
#: Longest one pull waits for messages, in seconds.
MAX_LONG_POLL_S = 10.0
#: A pull's deadline beyond its wait: Pub/Sub answers an empty pull about a second before it.
PULL_DEADLINE_MARGIN_S = 0.95
#: Longest ack deadline Pub/Sub takes in one call, in seconds.
MAX_ACK_DEADLINE_S = 600
#: Shortest ack deadline a subscription can have, in seconds.
MIN_SUBSCRIPTION_DEADLINE_S = 10
#: Most messages (or ack ids) one Publish, Pull, Acknowledge or ModifyAckDeadline call carries.
MAX_BATCH = 1000

_SCOPES = ["https://www.googleapis.com/auth/pubsub"]
_RETRYABLE = (
    google_exceptions.ServiceUnavailable,
    google_exceptions.DeadlineExceeded,
    google_exceptions.InternalServerError,
    google_exceptions.Aborted,
    google_exceptions.ResourceExhausted,
    google_exceptions.Unknown,
)
_DRIVER_ERRORS = (google_exceptions.GoogleAPIError, grpc.RpcError, OSError)


# -- the boundary -----------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """Google's error in our words: how to fix a missing name, why retrying stopped, a reachability hint."""
    if isinstance(exc, google_exceptions.NotFound):
        return f"not found ({exc.message}); run `hedwig-tasks provision`"
    if isinstance(exc, google_exceptions.RetryError):
        return f"gave up retrying: {exc.cause if exc.cause is not None else exc}"
    hint = " (is the Pub/Sub emulator or service reachable?)" if isinstance(exc, _RETRYABLE) else ""
    return f"{exc}{hint}"


def pubsub_errors(doing: str, error: type[TransportError] = TransportError) -> contextlib.AbstractContextManager[None]:
    """The transport boundary: Google's and gRPC's errors inside become ``error`` saying ``doing``."""
    return boundary(doing, _DRIVER_ERRORS, error=error, describe=_describe)


def short(path: str) -> str:
    """A topic's or subscription's own name, from its full path."""
    return path.rsplit("/", 1)[-1]


# -- the client -------------------------------------------------------------------------------


class PubSubClient:
    """Google's clients for one project, made on first use, and the calls made through them.

    Construction does no I/O. The emulator (the ``emulator`` given, else ``$PUBSUB_EMULATOR_HOST``
    read when the first client is made) takes no credentials; otherwise they come from
    ``credentials_file`` or Google's default chain, which may also tell the project.
    """

    def __init__(
        self,
        project: str | None,
        *,
        credentials_file: str | None,
        emulator: str | None,
        publish_timeout_s: float,
        batch_max_messages: int,
        batch_max_bytes: int,
        batch_max_latency_s: float,
        foreign: Mapping[str, str],
    ) -> None:
        self.project = project
        self.emulator = emulator
        self.publish_timeout_s = float(publish_timeout_s)
        self.batch_settings = pubsub_v1.types.BatchSettings(
            max_bytes=int(batch_max_bytes), max_latency=float(batch_max_latency_s), max_messages=int(batch_max_messages)
        )
        self.foreign = dict(foreign)  #: subscribed topic -> the other project that owns it
        self._credentials_file = credentials_file
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}

    def __repr__(self) -> str:
        shown = f" emulator={self.emulator!r}" if self.emulator else ""
        return f"<PubSubClient project={self.project!r}{shown}>"

    # -- Google's clients ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether any of Google's clients has been made yet."""
        return bool(self._clients)

    @property
    def publisher(self) -> Any:
        """Google's (GAPIC) publisher client: one call per publish, topics."""
        return self._client("publisher")

    @property
    def batcher(self) -> Any:
        """Google's batching publisher client, with ``batch_settings``."""
        return self._client("batcher")

    @property
    def subscriber(self) -> Any:
        """Google's (GAPIC) subscriber client: pulls, acknowledgements, subscriptions."""
        return self._client("subscriber")

    def _client(self, kind: str) -> Any:
        client = self._clients.get(kind)
        if client is None:
            with self._lock:
                client = self._clients.get(kind)
                if client is None:
                    client = self._clients[kind] = self._make(kind)
        return client

    def _make(self, kind: str) -> Any:
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
                return service_account.Credentials.from_service_account_file(self._credentials_file, scopes=_SCOPES)
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"GOOGLE_APPLICATION_CREDENTIALS: cannot read the key file: {exc}") from None
        import google.auth

        try:
            credentials, found_project = google.auth.default(scopes=_SCOPES)
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise ConfigurationError(f"no Google credentials: {exc}") from None
        self.project = self.project or found_project
        return credentials

    def close(self) -> None:
        """Flush the batching publisher and close every channel; clients are made again if used."""
        with self._lock:
            clients, self._clients = self._clients, {}
        batcher = clients.pop("batcher", None)
        if batcher is not None:
            with contextlib.suppress(Exception):
                batcher.stop()  # flushes what is batched
        for client in clients.values():
            with contextlib.suppress(Exception):
                client.transport.close()

    # -- names --------------------------------------------------------------------------------

    def require_project(self) -> str:
        """The project; Google's default credentials may tell it. Raises ``ConfigurationError``."""
        if not self.project:
            if not (self.emulator or os.environ.get("PUBSUB_EMULATOR_HOST")):
                self._client("publisher")  # google.auth.default() may know the project
            if not self.project:
                raise ConfigurationError("no Google Cloud project: use gcp://PROJECT or set GOOGLE_CLOUD_PROJECT")
        return self.project

    def topic_path(self, topic: str, owner: str | None = None) -> str:
        """``projects/<owner or ours>/topics/hedwig-<topic>``."""
        return f"projects/{owner or self.require_project()}/topics/hedwig-{topic}"

    def subscription_name(self, queue: str, topic: str | None = None) -> str:
        """``hedwig-<queue>-<topic>``, ``hedwig-<queue>-<project>-<topic>`` for another project's
        topic, or the app's own ``hedwig-<queue>`` when ``topic`` is None."""
        if topic is None:
            return f"hedwig-{queue}"
        owner = self.foreign.get(topic)
        return f"hedwig-{queue}-{owner}-{topic}" if owner else f"hedwig-{queue}-{topic}"

    def subscription_path(self, name: str) -> str:
        """``projects/<ours>/subscriptions/<name>``."""
        return f"projects/{self.require_project()}/subscriptions/{name}"

    def dlq_name(self, queue: str) -> str:
        """``hedwig-<queue>-dlq``: the dead letters' topic and subscription."""
        return f"hedwig-{queue}-dlq"

    # -- calls --------------------------------------------------------------------------------

    def _retry(self) -> Retry:
        return Retry(predicate=if_exception_type(*_RETRYABLE), initial=0.1, maximum=2.0, timeout=self.publish_timeout_s)

    def publish(self, path: str, messages: Sequence[tuple[bytes, Mapping[str, str]]], *, topic: str) -> list[str]:
        """One ``Publish`` call to the topic at ``path``; Pub/Sub's message ids in order.

        Retries an unavailable service for up to ``publish_timeout_s``, then raises
        ``PublishError`` naming ``topic``.
        """
        request = {"topic": path, "messages": [{"data": body, "attributes": dict(a)} for body, a in messages]}
        with pubsub_errors(f"publish to {topic!r} ({path})", PublishError):
            sent = self.publisher.publish(request=request, retry=self._retry(), timeout=self.publish_timeout_s)
        return list(sent.message_ids)

    def publish_batched(
        self, path: str, body: bytes, attributes: Mapping[str, str], *, topic: str
    ) -> concurrent.futures.Future[str]:
        """Queue one message on the batching publisher; a future of its id, or of ``PublishError``."""
        doing = f"publish to {topic!r} ({path})"
        result: concurrent.futures.Future[str] = concurrent.futures.Future()
        with pubsub_errors(doing, PublishError):
            inner = self.batcher.publish(path, body, retry=self._retry(), timeout=self.publish_timeout_s, **attributes)

        def done(future: Any) -> None:
            try:
                with pubsub_errors(doing, PublishError):
                    result.set_result(str(future.result()))
            except PublishError as exc:
                result.set_exception(exc)

        inner.add_done_callback(done)
        return result

    def pull(self, path: str, max_messages: int, wait_s: float, *, doing: str) -> list[Any]:
        """Up to ``max_messages`` received messages, waiting up to ``wait_s`` (at most 10 s); [] if none came."""
        # Pub/Sub answers an empty pull shortly before the call's deadline: the deadline is the wait.
        timeout_s = min(wait_s, MAX_LONG_POLL_S) + PULL_DEADLINE_MARGIN_S
        request = {"subscription": path, "max_messages": max(1, min(max_messages, MAX_BATCH))}
        with pubsub_errors(doing):
            try:
                response = self.subscriber.pull(request=request, timeout=timeout_s, retry=None)
            except google_exceptions.DeadlineExceeded:
                return []
        return list(response.received_messages)

    def acknowledge(self, path: str, ack_ids: Sequence[str], *, doing: str | None = None) -> None:
        """Acknowledge ``ack_ids`` on the subscription at ``path``, a thousand a call; returns once sent."""
        for start in range(0, len(ack_ids), MAX_BATCH):
            with pubsub_errors(doing or f"acknowledge on {short(path)}"):
                self.subscriber.acknowledge(
                    subscription=path, ack_ids=list(ack_ids[start : start + MAX_BATCH]), timeout=CALL_TIMEOUT_S
                )

    def modify_ack_deadline(
        self, path: str, ack_ids: Sequence[str], seconds: float, *, doing: str | None = None
    ) -> None:
        """Set the ack deadline of ``ack_ids`` to ``seconds`` from now (rounded up, at most 600; 0 gives them back)."""
        deadline = max(0, min(MAX_ACK_DEADLINE_S, math.ceil(seconds - 1e-9)))
        for start in range(0, len(ack_ids), MAX_BATCH):
            with pubsub_errors(doing or f"modify ack deadline on {short(path)}"):
                self.subscriber.modify_ack_deadline(
                    subscription=path,
                    ack_ids=list(ack_ids[start : start + MAX_BATCH]),
                    ack_deadline_seconds=deadline,
                    timeout=CALL_TIMEOUT_S,
                )
