"""AWS transport: publish to SNS topics, consume one SQS queue per app (boto3).

Features: fan-out by SNS to raw-delivery SQS subscriptions; publishing one message or batches
(``PublishBatch``, ten a call, split by size too), with the size and attribute limits checked
before sending; long-polled receives of up to ten a call, with parallel pollers when more are
wanted; acks batched into ``DeleteMessageBatch``; leases kept with
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
``endpoint_url`` (every service), ``sns_endpoint_url``, ``sqs_endpoint_url``, ``profile``,
``lease_s`` (visibility a receive takes, whole seconds; default 30) and ``max_receive_count``
(receives before the redrive policy moves a message to the DLQ; default 20). An unknown option
raises ``ConfigurationError``.

SQS keeps one stream per queue, so a consumer receives every topic its queue is subscribed to,
and :meth:`AWSTransport.status` reports one row for the queue. A receipt that was superseded by
a later receive of the same message in the same consumer settles nothing; across processes SQS
itself decides. An ack returns once its ``DeleteMessageBatch`` calls were sent.

Per-message fields that cannot be read (a Binary attribute, an SNS envelope whose message or
attributes are not text, a ``hedwig_dead_letter`` attribute that is not ours, a receive count
that is not a number) come back as a delivery with a ``fault``, the body as it came.

Modules: this one holds the transport (publishing, status and dead letters);
``_aws_consumer`` the consumer; ``_aws_admin`` provisioning; ``_aws_common`` the constants,
error boundary and wire helpers they share.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.transports._aws_admin import _Provisioner
from hedwig_tasks.transports._aws_common import (
    _NAME_RE,
    _RECEIVE_SYSTEM_ATTRIBUTES,
    BATCH,
    DEAD_LETTER_ATTRIBUTE,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_RECEIVE_COUNT,
    HEDWIG_SETTINGS,
    MAX_ATTRIBUTES,
    MAX_MESSAGE_BYTES,
    MAX_POLLERS,
    MAX_VISIBILITY_S,
    MAX_WAIT_S,
    _boundary,
    _chunks,
    _log_failures,
    _missing,
    _number,
    _options,
    _outgoing,
    _plain_attributes,
    _sent_at,
    _sized_batches,
    _split_dead_letter,
    _sqs_attributes,
    _whole,
    _whole_seconds,
    _with_dead_letter,
)
from hedwig_tasks.transports._aws_consumer import SQSConsumer
from hedwig_tasks.transports.base import (
    Capabilities,
    DeadLetterRecord,
    Progress,
    SubscriptionStatus,
    Transport,
)

__all__ = ["DEAD_LETTER_ATTRIBUTE", "MAX_MESSAGE_BYTES", "AWSTransport", "SQSConsumer"]


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
        self.region = region
        self.account_id = account_id
        self.profile = profile
        self.sns_endpoint_url = sns_endpoint_url or endpoint_url
        self.sqs_endpoint_url = sqs_endpoint_url or endpoint_url
        self.endpoint_url = endpoint_url
        self.lease_s = float(_whole_seconds(lease_s))
        self.max_receive_count = int(max_receive_count)
        self._credentials = (access_key_id, secret_access_key, session_token)
        self._config = {"connect": connect_timeout_s, "read": read_timeout_s, "attempts": max_attempts}
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._queue_urls: dict[str, str] = {}
        self._arns: dict[tuple[str, str | None], str] = {}
        self._partition: str | None = None

    @classmethod
    def from_url(cls, url: str) -> AWSTransport:
        """``aws://?region=...&endpoint_url=...``; see the module docstring for the options."""
        parts = urlsplit(url)
        if parts.scheme != "aws" or parts.netloc or parts.path not in ("", "/"):
            raise ConfigurationError(f"expected aws://?region=...&option=..., got {url!r}")
        options: dict[str, Any] = {k: v or None for k, v in _options(parts.query).items()}
        if options.get("lease_s") is not None:
            options["lease_s"] = _number("lease_s", options["lease_s"], float)
        if options.get("max_receive_count") is not None:
            options["max_receive_count"] = int(_number("max_receive_count", options["max_receive_count"], int))
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

    # -- clients and names --------------------------------------------------------------------

    def _client(self, service: str) -> Any:
        client = self._clients.get(service)
        if client is None:
            with self._lock:
                client = self._clients.get(service) or self._make_client(service)
                self._clients[service] = client
        return client

    def _make_client(self, service: str) -> Any:
        key, secret, token = self._credentials
        session = boto3.session.Session(
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            aws_session_token=token,
            region_name=self.region,
            profile_name=self.profile,
        )
        if session.region_name is None:
            raise ConfigurationError("no AWS region: add region=... to the aws:// URL or set AWS_DEFAULT_REGION")
        self.region = session.region_name
        endpoint = {"sns": self.sns_endpoint_url, "sqs": self.sqs_endpoint_url}.get(service, self.endpoint_url)
        read_timeout = self._config["read"]
        if service == "sqs":
            read_timeout = max(read_timeout, MAX_WAIT_S + 10)  # longer than the longest long poll
        config = Config(
            retries={"mode": "standard", "total_max_attempts": int(self._config["attempts"])},
            connect_timeout=self._config["connect"],
            read_timeout=read_timeout,
            max_pool_connections=MAX_POLLERS + 10,
        )
        return session.client(service, endpoint_url=endpoint, config=config)

    def _account(self) -> str:
        if self.account_id is None:
            with _boundary("finding the AWS account (sts GetCallerIdentity)"):
                self.account_id = str(self._client("sts").get_caller_identity()["Account"])
        return self.account_id

    def topic_arn(self, topic: str, owner: str | None = None) -> str:
        """The SNS topic ``hedwig-<topic>`` in ``owner``'s account (ours by default), or a full ARN."""
        if topic.startswith("arn:"):
            return topic
        arn = self._arns.get((topic, owner))
        if arn is None:
            if not _NAME_RE.match(topic):
                raise ConfigurationError(f"topic {topic!r}: SNS names take letters, digits, '-' and '_'")
            arn = self._arns[(topic, owner)] = self._arn("sns", f"hedwig-{topic}", owner)
        return arn

    def _arn(self, service: str, name: str, owner: str | None = None) -> str:
        if self._partition is None:
            self._client("sns")  # settles the region
            self._partition = boto3.session.Session().get_partition_for_region(self.region or "us-east-1")
        return f"arn:{self._partition}:{service}:{self.region}:{owner or self._account()}:{name}"

    @staticmethod
    def queue_name(queue: str, *, dlq: bool = False) -> str:
        """``HEDWIG-<queue>`` (or its ``-DLQ``), as authedwig names it from ``HEDWIG_QUEUE``."""
        name = f"HEDWIG-{queue}{'-DLQ' if dlq else ''}"
        if not _NAME_RE.match(queue) or len(f"HEDWIG-{queue}-DLQ") > 80:
            raise ConfigurationError(f"queue {queue!r}: SQS names take letters, digits, '-', '_', 69 at most")
        return name

    def _queue_url(self, name: str) -> str:
        url = self._queue_urls.get(name)
        if url is None:
            try:
                with _boundary(f"finding SQS queue {name}"):
                    url = str(self._client("sqs").get_queue_url(QueueName=name)["QueueUrl"])
            except TransportError as exc:
                if _missing(exc):
                    raise TransportError(f"SQS queue {name} does not exist; run `hedwig-tasks provision`") from exc
                raise
            self._queue_urls[name] = url
        return url

    def _queue_attributes(self, url: str, *names: str) -> dict[str, str]:
        with _boundary(f"reading attributes of {url}"):
            found = self._client("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=list(names))
        return dict(found.get("Attributes", {}))

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, topic: str, body: bytes, attributes: Mapping[str, str], *, owner: str | None = None) -> str:
        """SNS Publish to ``hedwig-<topic>``. Raises ``PublishError`` (limits are checked first)."""
        text = _outgoing(topic, body, attributes)
        arn = self.topic_arn(topic, owner)
        with self._publishing(topic, arn):
            sent = self._client("sns").publish(
                TopicArn=arn, Message=text, MessageAttributes=_sqs_attributes(attributes)
            )
        return str(sent["MessageId"])

    def publish_many(
        self,
        topic: str,
        messages: Sequence[tuple[bytes, Mapping[str, str]]],
        *,
        owner: str | None = None,
    ) -> list[str]:
        """SNS PublishBatch, ten (and 256 KiB) a call; every message is checked before any is sent.

        Raises ``PublishError`` naming how many were sent before the failure.
        """
        entries = [(i, _outgoing(topic, body, attrs), attrs) for i, (body, attrs) in enumerate(messages)]
        arn = self.topic_arn(topic, owner) if entries else ""
        ids: dict[int, str] = {}
        for batch in _sized_batches(entries):
            try:
                ids.update(self._publish_batch(topic, arn, batch))
            except PublishError as exc:
                raise PublishError(f"{exc} ({len(ids)} of {len(entries)} messages were sent)") from exc.__cause__
        return [ids[i] for i in range(len(entries))]

    def _publish_batch(self, topic: str, arn: str, batch: list[tuple[int, str, Any]]) -> dict[int, str]:
        pending = {str(i): (i, text, attrs) for i, text, attrs in batch}
        ids: dict[int, str] = {}
        for _ in range(3):  # botocore retries whole calls; entries failing on AWS's side are retried here
            request = [
                {"Id": key, "Message": text, "MessageAttributes": _sqs_attributes(attrs)}
                for key, (_, text, attrs) in pending.items()
            ]
            with self._publishing(topic, arn):
                result = self._client("sns").publish_batch(TopicArn=arn, PublishBatchRequestEntries=request)
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

    @contextlib.contextmanager
    def _publishing(self, topic: str, arn: str) -> Iterator[None]:
        try:
            with _boundary(f"publish to {topic!r} ({arn})", PublishError):
                yield
        except PublishError as exc:
            if _missing(exc):
                raise PublishError(f"topic {topic!r} ({arn}) does not exist; run `hedwig-tasks provision`") from exc
            raise

    # -- administration -----------------------------------------------------------------------

    def consumer(self, queue: str, topics: Sequence[str], *, max_outstanding: int | None = None) -> SQSConsumer:
        """A consumer of the whole queue ``HEDWIG-<queue>``: SQS cannot receive by topic."""
        return SQSConsumer(self, queue)

    def provision(
        self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str], *, dry_run: bool = False
    ) -> list[str]:
        """Topics, queue, DLQ, redrive policy, queue policy and raw-delivery subscriptions; idempotent."""
        return _Provisioner(self, dry_run).run(queue, subscribe, publish)

    def status(self, queue: str, topics: Sequence[str]) -> list[SubscriptionStatus]:
        """One row for the queue, whatever the topics: SQS counts per queue.

        Depth includes delayed sends; a message waiting out a ``retry_later`` counts as in
        flight, since SQS cannot tell it from a leased one.
        """
        name = self.queue_name(queue)
        counts = self._queue_attributes(
            self._queue_url(name),
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesDelayed",
            "ApproximateNumberOfMessagesNotVisible",
        )
        depth = int(counts["ApproximateNumberOfMessages"]) + int(counts.get("ApproximateNumberOfMessagesDelayed", 0))
        in_flight = int(counts["ApproximateNumberOfMessagesNotVisible"])
        return [SubscriptionStatus(name, ",".join(topics), depth, in_flight, self._dead_count(queue))]

    def _dead_count(self, queue: str) -> int | None:
        try:
            url = self._queue_url(self.queue_name(queue, dlq=True))
        except TransportError:
            return None
        counts = self._queue_attributes(url, "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
        return sum(int(v) for v in counts.values())

    def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetterRecord]:
        """Up to ``limit`` from the DLQ, left in place (received, then made visible again at once)."""
        url = self._queue_url(self.queue_name(queue, dlq=True))
        seen: dict[str, dict[str, Any]] = {}
        try:
            for messages in self._sample(url, limit):
                seen.update((m["MessageId"], m) for m in messages)
        finally:
            entries = [(m["MessageId"], m["ReceiptHandle"]) for m in seen.values()]
            self._change_visibility(url, entries, 0)
        return [self._record(queue, m) for m in sorted(seen.values(), key=_sent_at)][:limit]

    def _sample(self, url: str, limit: int) -> Iterator[list[dict[str, Any]]]:
        """Receive batches from a DLQ until ``limit`` or all it held at the start were seen."""
        counts = self._queue_attributes(url, "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
        target, found = min(limit, sum(int(v) for v in counts.values())), 0
        while found < target:
            messages = self._receive_raw(url, min(BATCH, target - found), 1, 30)
            if not messages:
                return
            found += len(messages)
            yield messages

    def _record(self, queue: str, message: dict[str, Any]) -> DeadLetterRecord:
        attributes, info = _split_dead_letter(_plain_attributes(message.get("MessageAttributes")))
        count = _whole((message.get("Attributes") or {}).get("ApproximateReceiveCount")) or 1
        dead_at = info.get("dead_at")
        return DeadLetterRecord(
            body=str(message.get("Body", "")).encode("utf-8", "surrogatepass"),
            attributes=attributes,
            reason=str(info.get("reason", "moved by the queue's redrive policy (never settled by a worker)")),
            subscription=str(info.get("subscription", self.queue_name(queue))),
            attempts=_whole(info.get("attempts")) or count,
            dead_at=float(dead_at) if isinstance(dead_at, (int, float)) else _sent_at(message) / 1000,
            transport_id=str(message.get("MessageId", "")),
        )

    def requeue_dead_letters(self, queue: str, *, limit: int | None = None, progress: Progress | None = None) -> int:
        """Move DLQ messages back to the queue (sent, then deleted from the DLQ), ten a call."""
        source = self._queue_url(self.queue_name(queue, dlq=True))
        target = self._queue_url(self.queue_name(queue))
        waiting = self._dead_count(queue) or 0
        total = waiting if limit is None else min(limit, waiting)
        done = 0
        while done < total:  # only what was there at the start: a requeued poison message is not looped
            messages = self._receive_raw(source, min(BATCH, total - done), 1, 60)
            if not messages:
                break
            done += self._move(source, target, messages)
            if progress is not None:
                progress(done, total)
        return done

    def _move(self, source: str, target: str, messages: list[dict[str, Any]]) -> int:
        entries = []
        for index, message in enumerate(messages):
            attributes, _ = _split_dead_letter(_plain_attributes(message.get("MessageAttributes")))
            if len(attributes) > MAX_ATTRIBUTES:  # keep the displaced ones where the consumer restores them
                attributes = _with_dead_letter(attributes, {})
            entry = {"Id": str(index), "MessageBody": message["Body"]}
            entries.append({**entry, "MessageAttributes": _sqs_attributes(attributes)} if attributes else entry)
        with _boundary(f"requeue to {target}"):
            result = self._client("sqs").send_message_batch(QueueUrl=target, Entries=entries)
        sent = {int(ok["Id"]) for ok in result.get("Successful", [])}
        self._delete(source, [(m["MessageId"], m["ReceiptHandle"]) for i, m in enumerate(messages) if i in sent])
        if len(sent) < len(messages):
            failed = result.get("Failed", [{}])[0]
            raise TransportError(f"requeue to {target}: {failed.get('Code', '?')}: {failed.get('Message', '')}")
        return len(sent)

    # -- SQS calls shared by the consumer and the DLQ tools ------------------------------------

    def _receive_raw(self, url: str, count: int, wait_s: int, visibility_s: int) -> list[dict[str, Any]]:
        with _boundary(f"receive from {url}"):
            found = self._client("sqs").receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=wait_s,
                VisibilityTimeout=visibility_s,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=_RECEIVE_SYSTEM_ATTRIBUTES,
            )
        return list(found.get("Messages", []))

    def _delete(self, url: str, entries: Sequence[tuple[str, str]]) -> None:
        """DeleteMessageBatch, ten a call; entries are (message id, receipt handle)."""
        for chunk in _chunks(entries):
            request = [{"Id": str(i), "ReceiptHandle": handle} for i, (_, handle) in enumerate(chunk)]
            with _boundary(f"deleting messages from {url}"):
                result = self._client("sqs").delete_message_batch(QueueUrl=url, Entries=request)
            _log_failures("delete", chunk, result)

    def _change_visibility(self, url: str, entries: Sequence[tuple[str, str]], visibility_s: int) -> None:
        """ChangeMessageVisibilityBatch, ten a call; entries are (message id, receipt handle)."""
        for chunk in _chunks(entries):
            request = [
                {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": visibility_s}
                for i, (_, handle) in enumerate(chunk)
            ]
            with _boundary(f"change visibility in {url}"):
                result = self._client("sqs").change_message_visibility_batch(QueueUrl=url, Entries=request)
            _log_failures("change visibility", chunk, result)

    def close(self) -> None:
        """Drop the clients; the next call makes new ones."""
        with self._lock:
            clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()
