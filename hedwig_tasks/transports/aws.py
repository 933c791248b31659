"""AWS transport: publish to SNS topics, consume one SQS queue per app (boto3).

Features: fan-out by SNS to raw-delivery SQS subscriptions; publishing one message or batches
(``PublishBatch``, ten a call, split by size too), with the size and attribute limits checked
before sending; long-polled receives of up to ten a call, with parallel pollers when more are
wanted; delayed publishes (a ``hedwig_not_before`` attribute; the consumer holds an early
message with SQS, by visibility and by sending it again with ``DelaySeconds``, never in
memory); acks batched into ``DeleteMessageBatch``; leases kept with
``ChangeMessageVisibilityBatch``; delayed retries as message visibility (up to 12 hours, never
held in memory); dead letters sent with their reason to the ``-DLQ`` queue, and a redrive policy
as a safety net for workers that die on a message; provisioning, status, dead-letter listing
and requeue. Wire-compatible with authedwig's ``AWSSNSPublisherBackend`` and
``AWSSQSConsumerBackend``.

Names: topic ``t`` is the SNS topic ``hedwig-t`` (a full ``arn:...`` topic is used as given);
queue ``q`` is the SQS queue ``HEDWIG-q`` with dead letters in ``HEDWIG-q-DLQ``, spelled
exactly as authedwig spells them from ``HEDWIG_QUEUE`` (it does not change the case).

Connection string: ``aws://?region=us-east-1`` plus options, e.g.
``aws://?region=us-east-1&endpoint_url=http://127.0.0.1:5000&account_id=123456789012``.
Credentials come from boto3's usual chain (environment, profile, instance role) or the
constructor's keyword arguments, never from the URL.

Options (query string): ``region``, ``account_id`` (found with STS when not given),
``endpoint_url`` (every service), ``sns_endpoint_url``, ``sqs_endpoint_url``, ``profile`` (each
of these left empty is as if not given), ``lease_s`` (visibility a receive takes, rounded up
to whole seconds; default 30) and ``max_receive_count`` (receives before the redrive policy
moves a message to the DLQ; default 20). An unknown option raises ``ConfigurationError``.

SQS keeps one stream per queue, so a consumer receives every topic its queue is subscribed to,
and :meth:`AWSTransport.status` reports one row for the queue. A receipt that was superseded by
a later receive of the same message in the same consumer settles nothing; across processes SQS
itself decides. An ack returns once its ``DeleteMessageBatch`` calls were sent.

Per-message fields that cannot be read (a Binary attribute, an SNS envelope whose message or
attributes are not text, a ``hedwig_dead_letter`` attribute that is not ours, a receive count
that is not a number) come back as a delivery with a ``fault``, the body as it came.

Modules: this one holds the transport (construction from a URL or Hedwig's settings,
publishing, status); ``_aws_client`` the boto3 clients, queue URLs and SNS/SQS calls that the
others share, and the error boundary; ``_aws_consumer`` the consumer; ``_aws_admin``
provisioning and the dead-letter queue; ``_aws_wire`` the message limits and reading and
writing a message's fields.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from hedwig_tasks.exceptions import ConfigurationError, PublishError
from hedwig_tasks.transports._aws_admin import DeadLetterQueue, Provisioner
from hedwig_tasks.transports._aws_client import MAX_POLLERS, MAX_VISIBILITY_S, AWSClient, missing, whole_seconds
from hedwig_tasks.transports._aws_client import queue_name as _queue_name
from hedwig_tasks.transports._aws_consumer import SQSConsumer
from hedwig_tasks.transports._aws_wire import (
    BATCH,
    DEAD_LETTER_ATTRIBUTE,
    MAX_ATTRIBUTES,
    MAX_MESSAGE_BYTES,
    NOT_BEFORE_ATTRIBUTE,
    outgoing,
    sized_batches,
)
from hedwig_tasks.transports._url import Option, count, read_options, seconds
from hedwig_tasks.transports.base import (
    Capabilities,
    DeadLetterRecord,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = ["DEAD_LETTER_ATTRIBUTE", "MAX_MESSAGE_BYTES", "AWSTransport", "SQSConsumer"]

#: Visibility a receive takes and each lease extension asks for, in seconds.
DEFAULT_LEASE_S = 30.0
#: Receives after which the redrive policy moves a message to the DLQ (the safety net).
DEFAULT_MAX_RECEIVE_COUNT = 20

#: Hedwig setting -> constructor argument.
HEDWIG_SETTINGS = {
    "AWS_REGION": "region",
    "AWS_ACCOUNT_ID": "account_id",
    "AWS_ACCESS_KEY": "access_key_id",
    "AWS_SECRET_KEY": "secret_access_key",
    "AWS_SESSION_TOKEN": "session_token",
    "AWS_ENDPOINT_SNS": "sns_endpoint_url",
    "AWS_ENDPOINT_SQS": "sqs_endpoint_url",
    "AWS_CONNECT_TIMEOUT_S": "connect_timeout_s",
    "AWS_READ_TIMEOUT_S": "read_timeout_s",
    "HEDWIG_VISIBILITY_TIMEOUT_S": "lease_s",
}


def _given(value: str) -> str | None:
    """Text; left empty, as if not given (boto3's own chain decides)."""
    return value or None


_URL_OPTIONS: dict[str, Option] = {
    "account_id": _given,
    "endpoint_url": _given,
    "lease_s": seconds,
    "max_receive_count": count,
    "profile": _given,
    "region": _given,
    "sns_endpoint_url": _given,
    "sqs_endpoint_url": _given,
}


# -- the transport ----------------------------------------------------------------------------


class AWSTransport(Transport):
    """SNS topics and SQS queues in one account and region; clients are made on first use."""

    scheme = "aws"
    messaging_system = "aws_sqs"
    capabilities = Capabilities(
        text_only=True,
        max_delay_s=float(MAX_VISIBILITY_S),
        max_lease_s=float(MAX_VISIBILITY_S),
        max_receive_batch=BATCH * MAX_POLLERS,
        max_attributes=MAX_ATTRIBUTES,
        per_topic_consumption=False,  # one SQS queue per app carries every topic it subscribes to
        delayed_publish=True,
    )

    def __init__(
        self,
        *,
        region: str | None = None,
        account_id: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        endpoint_url: str | None = None,
        sns_endpoint_url: str | None = None,
        sqs_endpoint_url: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        if not 1 <= lease_s <= MAX_VISIBILITY_S:
            raise ConfigurationError(f"lease_s must be 1 to {MAX_VISIBILITY_S} seconds, got {lease_s!r}")
        if not 1 <= max_receive_count <= 1000:
            raise ConfigurationError(f"max_receive_count must be 1 to 1000, got {max_receive_count!r}")
        self.profile = profile
        self.sns_endpoint_url = sns_endpoint_url or endpoint_url
        self.sqs_endpoint_url = sqs_endpoint_url or endpoint_url
        self.endpoint_url = endpoint_url
        self.lease_s = float(whole_seconds(lease_s))
        self.max_receive_count = int(max_receive_count)
        #: boto3's clients and the SNS/SQS calls this transport, its consumers and provisioning share.
        self.client = AWSClient(
            region=region,
            account_id=account_id,
            profile=profile,
            credentials=(access_key_id, secret_access_key, session_token),
            endpoints={"sns": self.sns_endpoint_url, "sqs": self.sqs_endpoint_url, "sts": endpoint_url},
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_attempts=max_attempts,
        )

    @classmethod
    def from_url(cls, url: str) -> AWSTransport:
        """``aws://?region=...&endpoint_url=...``; see the module docstring for the options."""
        parts = urlsplit(url)
        if parts.scheme != "aws" or parts.netloc or parts.path not in ("", "/"):
            raise ConfigurationError(f"expected aws://?region=...&option=..., got {url!r}")
        options, _ = read_options("aws", parts.query, _URL_OPTIONS)
        return cls(**options)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> AWSTransport:
        """Build from Hedwig's settings (``AWS_REGION``, ``AWS_ACCESS_KEY``, ``AWS_ENDPOINT_SQS``...).

        ``settings`` is anything indexed by setting name: a dict, or ``HedwigSettings``.
        """
        given = {}
        for name, argument in HEDWIG_SETTINGS.items():
            with contextlib.suppress(KeyError):
                if settings[name] is not None:
                    given[argument] = settings[name]
        return cls(**{**given, **overrides})

    def __repr__(self) -> str:
        endpoint = f" endpoint={self.endpoint_url or self.sqs_endpoint_url or self.sns_endpoint_url!r}"
        shown = endpoint if (self.endpoint_url or self.sqs_endpoint_url or self.sns_endpoint_url) else ""
        return f"<AWSTransport region={self.region!r} account={self.account_id!r}{shown}>"

    # -- names --------------------------------------------------------------------------------

    @property
    def region(self) -> str | None:
        """The region: as given, else boto3's (environment, profile) once a client was made."""
        return self.client.region

    @property
    def account_id(self) -> str | None:
        """The account: as given, else STS's once an ARN needed it."""
        return self.client.account_id

    def topic_arn(self, topic: str, owner: str | None = None) -> str:
        """The SNS topic ``hedwig-<topic>`` in ``owner``'s account (ours by default), or a full ARN."""
        return self.client.topic_arn(topic, owner)

    @staticmethod
    def queue_name(queue: str, *, dlq: bool = False) -> str:
        """``HEDWIG-<queue>`` (or its ``-DLQ``), as authedwig names it from ``HEDWIG_QUEUE``."""
        return _queue_name(queue, dlq=dlq)

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
        """SNS Publish to ``hedwig-<topic>``. Raises ``PublishError`` (limits are checked first).

        A delay rides in ``hedwig_not_before`` (SNS has none): see :func:`not_before`.
        """
        attributes = not_before(attributes, delay_s)
        text = outgoing(topic, body, attributes)
        arn = self.topic_arn(topic, owner)
        with _naming_a_missing_topic(topic, arn):
            return self.client.publish(arn, text, attributes, doing=f"publish to {topic!r} ({arn})")

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
        delay_s: float = 0,
    ) -> list[str]:
        """SNS PublishBatch, ten (and 256 KiB) a call; every message is checked before any is sent.

        Raises ``PublishError`` naming how many were sent before the failure.
        """
        delayed = [(body, not_before(attrs, delay_s)) for body, attrs in messages]
        entries = [(i, outgoing(topic, body, attrs), attrs) for i, (body, attrs) in enumerate(delayed)]
        arn = self.topic_arn(topic, owner) if entries else ""
        ids: dict[int, str] = {}
        for batch in sized_batches(entries):
            try:
                ids.update(self._publish_batch(topic, arn, batch))
            except PublishError as exc:
                raise PublishError(f"{exc} ({len(ids)} of {len(entries)} messages were sent)") from exc.__cause__
        return [ids[i] for i in range(len(entries))]

    def _publish_batch(self, topic: str, arn: str, batch: list[tuple[int, str, Any]]) -> dict[int, str]:
        pending = {str(i): (i, text, attrs) for i, text, attrs in batch}
        ids: dict[int, str] = {}
        for _ in range(3):  # botocore retries whole calls; entries failing on AWS's side are retried here
            request = {key: (text, attrs) for key, (_, text, attrs) in pending.items()}
            with _naming_a_missing_topic(topic, arn):
                result = self.client.publish_batch(arn, request, doing=f"publish to {topic!r} ({arn})")
            for ok in result.get("Successful", []):
                ids[pending.pop(ok["Id"])[0]] = str(ok["MessageId"])
            failed = result.get("Failed", [])
            if not failed or any(f.get("SenderFault") for f in failed):
                break
        if pending:
            first = result.get("Failed", [{}])[0]
            raise PublishError(
                f"publish to {topic!r} ({arn}): {len(pending)} of a batch failed: "
                f"{first.get('Code', '?')}: {first.get('Message', '')}"
            )
        return ids

    # -- consuming and administration ---------------------------------------------------------

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> SQSConsumer:
        """A consumer of the whole queue ``HEDWIG-<queue>``: SQS cannot receive by topic."""
        return SQSConsumer(self.client, queue, lease_s=self.lease_s)

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Topics, queue, DLQ, redrive policy, queue policy and raw-delivery subscriptions; idempotent."""
        provisioner = Provisioner(
            self.client, lease_s=self.lease_s, max_receive_count=self.max_receive_count, dry_run=dry_run
        )
        return provisioner.run(queue, subscribe, publish)

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """One row for the queue, whatever the topics: SQS counts per queue.

        Depth includes delayed sends; a message waiting out a ``retry_later`` counts as in
        flight, since SQS cannot tell it from a leased one.
        """
        name = self.queue_name(queue)
        counts = self.client.queue_attributes(
            self.client.queue_url(name),
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesDelayed",
            "ApproximateNumberOfMessagesNotVisible",
        )
        depth = int(counts["ApproximateNumberOfMessages"]) + int(counts.get("ApproximateNumberOfMessagesDelayed", 0))
        in_flight = int(counts["ApproximateNumberOfMessagesNotVisible"])
        dead = DeadLetterQueue(self.client, queue).count()
        return [SubscriptionStatus(name, ",".join(topics), depth, in_flight, dead)]

    def dead_letters(
        self, queue: str, *, limit: int = 100, ids: Collection[str] | None = None
    ) -> list[DeadLetterRecord]:
        """Up to ``limit`` from the DLQ (their message ids in ``ids``, if given), left in place."""
        return DeadLetterQueue(self.client, queue).records(limit, ids)

    def requeue_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Move DLQ messages back to the queue (sent, then deleted from the DLQ), ten a call."""
        return DeadLetterQueue(self.client, queue).requeue(limit, progress, ids)

    def purge_dead_letters(
        self,
        queue: str,
        *,
        limit: int | None = None,
        progress: Progress | None = None,
        ids: Collection[str] | None = None,
    ) -> int:
        """Delete DLQ messages for good, ten a call; returns how many."""
        return DeadLetterQueue(self.client, queue).purge(limit, progress, ids)

    def close(self) -> None:
        """Drop the clients; the next call makes new ones."""
        self.client.close()


def not_before(attributes: Mapping[str, str], delay_s: float) -> Mapping[str, str]:
    """The attributes, plus ``hedwig_not_before`` (epoch ms) when there is a delay.

    SNS has no delay of its own: the consumer holds an early message with SQS (by visibility,
    then by sending it again with ``DelaySeconds``) until that time. The attribute takes one of
    the ten SQS carries.
    """
    if delay_s <= 0:
        return attributes
    return {**attributes, NOT_BEFORE_ATTRIBUTE: str(math.ceil((time.time() + delay_s) * 1000))}


@contextlib.contextmanager
def _naming_a_missing_topic(topic: str, arn: str) -> Iterator[None]:
    """A publish to a topic that does not exist says which, and how to create it."""
    try:
        yield
    except PublishError as exc:
        if missing(exc):
            raise PublishError(f"topic {topic!r} ({arn}) does not exist; run `hedwig-tasks provision`") from exc
        raise
