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
itself decides. Acks are sent in the background within ``ack_linger_s``; ``close`` flushes them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

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

__all__ = ["AWSTransport", "SQSConsumer"]

logger = logging.getLogger(__name__)

#: Visibility a receive takes and each lease extension asks for, in seconds.
DEFAULT_LEASE_S = 30.0
#: Receives after which the redrive policy moves a message to the DLQ (the safety net).
DEFAULT_MAX_RECEIVE_COUNT = 20
#: How long an ack waits for others to share its DeleteMessageBatch, in seconds.
DEFAULT_ACK_LINGER_S = 0.05
#: Longest visibility SQS allows, counted from a receive, in seconds (12 hours).
MAX_VISIBILITY_S = 43200
#: Longest long poll SQS allows, in seconds.
MAX_WAIT_S = 20
#: Most entries in one SQS or SNS batch call.
BATCH = 10
#: Largest SNS/SQS message, body plus attribute names, types and values, in bytes.
MAX_MESSAGE_BYTES = 262144
#: Most message attributes an SQS message (and raw SNS delivery to SQS) carries.
MAX_ATTRIBUTES = 10
#: Most parallel ReceiveMessage calls one consumer makes.
MAX_POLLERS = 10
#: Longest dead-letter reason kept, in characters.
MAX_REASON_CHARS = 4096
#: Retention of the dead-letter queue, in seconds (the SQS maximum, 14 days).
DLQ_RETENTION_S = 1209600
#: The attribute a dead letter's reason (and any attributes it displaced) rides in.
DEAD_LETTER_ATTRIBUTE = "hedwig_dead_letter"
#: The queue policy statement provision writes to let SNS deliver.
POLICY_SID = "HedwigTasksSNSDelivery"

_URL_OPTIONS = (
    "account_id",
    "endpoint_url",
    "lease_s",
    "max_receive_count",
    "profile",
    "region",
    "sns_endpoint_url",
    "sqs_endpoint_url",
)
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
_AUTH_CODES = frozenset(
    {"InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch", "ExpiredToken", "AccessDenied"}
)
_XML_ERROR_RE = re.compile(r"<Code>([^<]+)</Code>\s*<Message>([^<]*)</Message>")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Characters SQS accepts in bodies and attribute values (raw SNS delivery drops anything else).
_BAD_CHARS_RE = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_RECEIVE_SYSTEM_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp"]


# -- boundary and wire helpers ----------------------------------------------------------------


@contextlib.contextmanager
def _boundary(doing: str, error: type[TransportError] = TransportError) -> Iterator[None]:
    """Turn botocore's errors into ours: the transport boundary."""
    try:
        yield
    except ClientError as exc:
        code, message = _describe(exc)
        hint = " (check the AWS credentials)" if code in _AUTH_CODES or code == "403" else ""
        raise error(f"{doing} failed: {code}: {message}{hint}") from exc
    except NoCredentialsError as exc:
        raise error(f"{doing} failed: no AWS credentials found (environment, profile or role)") from exc
    except BotoCoreError as exc:
        raise error(f"{doing} failed: {exc}") from exc


def _describe(exc: ClientError) -> tuple[str, str]:
    """Error code and message; read from the body when botocore could not parse it (an XML error
    answering a JSON request, as some emulators send)."""
    info = exc.response.get("Error", {})
    code, message = str(info.get("Code", "?")), str(info.get("Message", exc))
    found = _XML_ERROR_RE.search(message) if code.isdigit() else None
    return (found.group(1), found.group(2)) if found else (code, message)


def _error_code(exc: BaseException | None) -> str:
    """The AWS error code behind one of our errors ("" if botocore raised none)."""
    while exc is not None and not isinstance(exc, ClientError):
        exc = exc.__cause__
    return str(exc.response.get("Error", {}).get("Code", "")) if exc is not None else ""


def _missing(exc: BaseException) -> bool:
    """Whether a TransportError says the topic or queue does not exist."""
    code = _error_code(exc)
    return code in ("NotFound", "NotFoundException") or "NonExistentQueue" in code or "QueueDoesNotExist" in code


def _sqs_attributes(attributes: Mapping[str, str]) -> dict[str, dict[str, str]]:
    return {name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()}


def _plain_attributes(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """String values of SQS message attributes (binary ones as they came, base64 text)."""
    found = {}
    for name, value in (raw or {}).items():
        text = value.get("StringValue", value.get("BinaryValue", b""))
        found[name] = text.decode("ascii", "replace") if isinstance(text, bytes) else str(text)
    return found


def _wire_size(body: str, attributes: Mapping[str, str]) -> int:
    size = len(body.encode())
    return size + sum(len(k.encode()) + len("String") + len(v.encode()) for k, v in attributes.items())


def _outgoing(topic: str, body: bytes, attributes: Mapping[str, str]) -> str:
    """The body as text, after checking what SNS and SQS would refuse or silently drop."""
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise PublishError(f"publish to {topic!r}: SNS carries text and the body is not UTF-8") from None
    if _BAD_CHARS_RE.search(text):
        raise PublishError(f"publish to {topic!r}: the body holds characters SQS does not accept")
    if len(attributes) > MAX_ATTRIBUTES:
        raise PublishError(
            f"publish to {topic!r}: {len(attributes)} attributes, but SQS delivery carries at most "
            f"{MAX_ATTRIBUTES} (AWS drops such messages); use fewer headers or the container form"
        )
    for name, value in attributes.items():
        if not value or _BAD_CHARS_RE.search(value):
            raise PublishError(f"publish to {topic!r}: attribute {name!r} must be non-empty text SQS accepts")
    size = _wire_size(text, attributes)
    if size > MAX_MESSAGE_BYTES:
        raise PublishError(f"publish to {topic!r}: message is {size} bytes; SNS takes at most {MAX_MESSAGE_BYTES}")
    return text


def _sized_batches(entries: list[tuple[int, str, Mapping[str, str]]]) -> Iterator[list[tuple[int, str, Any]]]:
    """Entries in batches of at most ten and at most MAX_MESSAGE_BYTES in all."""
    batch: list[tuple[int, str, Any]] = []
    size = 0
    for entry in entries:
        entry_size = _wire_size(entry[1], entry[2])
        if batch and (len(batch) == BATCH or size + entry_size > MAX_MESSAGE_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += entry_size
    if batch:
        yield batch


def _unwrap_envelope(body: str, attributes: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Body and attributes of an SNS notification delivered without raw delivery."""
    if attributes or not body.startswith("{"):
        return body, attributes
    try:
        envelope = json.loads(body)
    except ValueError:
        return body, attributes
    if not isinstance(envelope, dict) or envelope.get("Type") != "Notification" or "TopicArn" not in envelope:
        return body, attributes
    raw = envelope.get("MessageAttributes") or {}
    return str(envelope.get("Message", "")), {k: str(v.get("Value", "")) for k, v in raw.items()}


def _split_dead_letter(attributes: dict[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
    """The message's own attributes (displaced ones restored) and the dead-letter info."""
    raw = attributes.pop(DEAD_LETTER_ATTRIBUTE, None)
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    attributes.update(info.get("attributes") or {})
    return attributes, info


def _with_dead_letter(attributes: Mapping[str, str], info: dict[str, Any]) -> dict[str, str]:
    """Attributes plus the dead-letter info, moving attributes into it past the limit of ten."""
    kept = {k: v for k, v in attributes.items() if k != DEAD_LETTER_ATTRIBUTE}
    if len(kept) >= MAX_ATTRIBUTES:
        ranked = sorted(kept, key=lambda name: (not name.startswith("hedwig_"), name))
        info = {**info, "attributes": {name: kept.pop(name) for name in ranked[MAX_ATTRIBUTES - 1 :]}}
    kept[DEAD_LETTER_ATTRIBUTE] = json.dumps(info, ensure_ascii=False, separators=(",", ":"))
    return kept


def _whole_seconds(seconds: float) -> int:
    return max(0, math.ceil(seconds - 1e-9))


def _options(query: str) -> dict[str, str]:
    given = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(given) - set(_URL_OPTIONS))
    if unknown:
        raise ConfigurationError(f"unknown aws option(s) {', '.join(unknown)} (known: {', '.join(_URL_OPTIONS)})")
    return {name: values[-1] for name, values in given.items()}


def _number(name: str, value: str, cast: Callable[[str], float]) -> float:
    try:
        return cast(value)
    except ValueError:
        raise ConfigurationError(f"aws option {name}={value!r} must be a number") from None


@dataclasses.dataclass(eq=False)
class _Receipt:
    """One receive of one message: its handle, and whether it may still settle anything."""

    handle: str
    message_id: str
    received_at: float  # monotonic
    settled: bool = False
    superseded: bool = False

    @property
    def live(self) -> bool:
        return not (self.settled or self.superseded)


# -- the transport ----------------------------------------------------------------------------


class AWSTransport(Transport):
    """SNS topics and SQS queues in one account and region; clients are made on first use."""

    scheme = "aws"
    capabilities = Capabilities(
        text_only=True,
        max_delay_s=float(MAX_VISIBILITY_S),
        max_lease_s=float(MAX_VISIBILITY_S),
        max_receive_batch=BATCH * MAX_POLLERS,
        max_publish_batch=BATCH,
        max_attributes=MAX_ATTRIBUTES,
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
        ack_linger_s: float = DEFAULT_ACK_LINGER_S,
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
        self.ack_linger_s = ack_linger_s
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
        count = int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        return DeadLetterRecord(
            body=str(message.get("Body", "")).encode(),
            attributes=attributes,
            reason=str(info.get("reason", "moved by the queue's redrive policy (never settled by a worker)")),
            subscription=str(info.get("subscription", self.queue_name(queue))),
            attempts=int(info.get("attempts", count)),
            dead_at=float(info.get("dead_at", _sent_at(message) / 1000)),
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


def _chunks(entries: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(entries), BATCH):
        yield entries[start : start + BATCH]


def _sent_at(message: Mapping[str, Any]) -> int:
    return int(message.get("Attributes", {}).get("SentTimestamp", 0))


def _log_failures(what: str, chunk: Sequence[tuple[str, str]], result: Mapping[str, Any]) -> None:
    for failure in result.get("Failed", []):
        message_id = chunk[int(failure["Id"])][0]
        # A receipt of a message already deleted (or received again elsewhere) is expected now and then.
        level = logging.DEBUG if failure.get("Code") == "ReceiptHandleIsInvalid" else logging.WARNING
        logger.log(level, "%s of SQS message %s failed: %s", what, message_id, failure.get("Message", ""))


# -- provisioning -----------------------------------------------------------------------------


class _Provisioner:
    """Finds what is missing and creates it (or, in a dry run, only says so)."""

    def __init__(self, transport: AWSTransport, dry_run: bool) -> None:
        self.transport = transport
        self.dry_run = dry_run
        self.sns = transport._client("sns")
        self.sqs = transport._client("sqs")
        self.actions: list[str] = []

    def do(self, action: str, call: Callable[[], Any]) -> Any:
        self.actions.append(action)
        if not self.dry_run:
            with _boundary(f"provision: {action}"):
                return call()
        return None

    def run(self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str]) -> list[str]:
        for topic in dict.fromkeys([*publish, *subscribe]):
            self.topic(topic)
        if queue is not None:
            self.queue(queue, list(dict.fromkeys(subscribe)))
        return self.actions

    def topic(self, topic: str) -> None:
        arn = self.transport.topic_arn(topic)
        if topic.startswith("arn:") or self.exists(lambda: self.sns.get_topic_attributes(TopicArn=arn)):
            return
        name = arn.rsplit(":", 1)[1]
        self.do(f"create topic {topic} (SNS {name})", lambda: self.sns.create_topic(Name=name))

    def exists(self, call: Callable[[], Any]) -> bool:
        try:
            with _boundary("provision: look up"):
                call()
        except TransportError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def queue(self, queue: str, topics: list[str]) -> None:
        name, dlq_name = self.transport.queue_name(queue), self.transport.queue_name(queue, dlq=True)
        dlq_arn = self.ensure_queue(dlq_name, {"MessageRetentionPeriod": str(DLQ_RETENTION_S)}, "dead letters")
        queue_arn = self.ensure_queue(name, {"VisibilityTimeout": str(int(self.transport.lease_s))}, "messages")
        redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": self.transport.max_receive_count}
        current = self.attributes(name, "RedrivePolicy", "Policy")
        if json.loads(current.get("RedrivePolicy") or "{}").get("deadLetterTargetArn") != dlq_arn:
            self.set_attributes(
                f"set redrive policy of {name}: to {dlq_name} after {redrive['maxReceiveCount']} receives",
                name,
                {"RedrivePolicy": json.dumps(redrive)},
            )
        arns = [self.transport.topic_arn(t) for t in topics]
        self.allow(name, queue_arn, current.get("Policy"), [(t, a) for t, a in zip(topics, arns, strict=True)])
        for topic, arn in zip(topics, arns, strict=True):
            self.subscription(name, queue_arn, topic, arn)

    def ensure_queue(self, name: str, attributes: dict[str, str], what: str) -> str:
        arn = self.transport._arn("sqs", name)
        if not self.exists(lambda: self.transport._queue_url(name)):
            self.do(
                f"create queue {name} ({what})", lambda: self.sqs.create_queue(QueueName=name, Attributes=attributes)
            )
            return arn
        return self.attributes(name, "QueueArn").get("QueueArn", arn)

    def attributes(self, name: str, *names: str) -> dict[str, str]:
        if name not in self.transport._queue_urls and self.dry_run:
            return {}  # planned, not created: nothing set yet
        return self.transport._queue_attributes(self.transport._queue_url(name), *names)

    def set_attributes(self, action: str, name: str, attributes: dict[str, str]) -> None:
        url = self.transport._queue_urls.get(name, "")
        self.do(action, lambda: self.sqs.set_queue_attributes(QueueUrl=url or self.transport._queue_url(name),
                                                               Attributes=attributes))  # fmt: skip

    def allow(self, name: str, queue_arn: str, policy_text: str | None, topics: list[tuple[str, str]]) -> None:
        """Let SNS deliver each topic to the queue, keeping whatever else the policy says."""
        empty: dict[str, Any] = {"Version": "2012-10-17", "Statement": []}
        policy: dict[str, Any] = json.loads(policy_text) if policy_text else empty
        missing = [(t, arn) for t, arn in topics if arn not in json.dumps(policy)]
        if not missing:
            return
        statements = [s for s in policy["Statement"] if s.get("Sid") != POLICY_SID]
        ours = next((s for s in policy["Statement"] if s.get("Sid") == POLICY_SID), None)
        sources = list(ours["Condition"]["ArnEquals"]["aws:SourceArn"]) if ours else []
        sources += [arn for _, arn in missing]
        statements.append(
            {
                "Sid": POLICY_SID,
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": sources}},
            }
        )
        policy["Statement"] = statements
        names = ", ".join(t for t, _ in missing)
        self.set_attributes(f"allow {names} to deliver to {name} (queue policy)", name, {"Policy": json.dumps(policy)})

    def subscription(self, name: str, queue_arn: str, topic: str, topic_arn: str) -> None:
        found = self.existing_subscription(topic_arn, queue_arn)
        if found is None:
            self.do(
                f"subscribe {name} to {topic} (raw delivery)",
                lambda: self.sns.subscribe(
                    TopicArn=topic_arn,
                    Protocol="sqs",
                    Endpoint=queue_arn,
                    Attributes={"RawMessageDelivery": "true"},
                    ReturnSubscriptionArn=True,
                ),
            )
            return
        with _boundary(f"provision: read subscription {found}"):
            raw = self.sns.get_subscription_attributes(SubscriptionArn=found)["Attributes"].get("RawMessageDelivery")
        if raw != "true":
            self.do(
                f"turn on raw delivery of {topic} to {name}",
                lambda: self.sns.set_subscription_attributes(
                    SubscriptionArn=found, AttributeName="RawMessageDelivery", AttributeValue="true"
                ),
            )

    def existing_subscription(self, topic_arn: str, queue_arn: str) -> str | None:
        if self.dry_run and not self.exists(lambda: self.sns.get_topic_attributes(TopicArn=topic_arn)):
            return None
        with _boundary(f"provision: list subscriptions of {topic_arn}"):
            pages = self.sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn)
            for page in pages:
                for sub in page.get("Subscriptions", []):
                    if sub.get("Endpoint") == queue_arn and sub.get("Protocol") == "sqs":
                        return str(sub["SubscriptionArn"])
        return None


# -- the consumer -----------------------------------------------------------------------------


class SQSConsumer(Consumer):
    """Receives and settles the messages of one SQS queue. Thread-safe.

    Receives run on a small pool of pollers, so one call can keep several long polls open;
    messages a poller brings after its caller returned wait for the next ``receive``. A
    lock orders lease extensions against settlements, so an extension never undoes a
    ``retry_later`` or ``release`` that came after it.
    """

    def __init__(self, transport: AWSTransport, queue: str) -> None:
        self._transport = transport
        self._queue = queue
        self._name = transport.queue_name(queue)
        self._cond = threading.Condition()
        self._stash: list[Delivery] = []
        self._polling = 0  # messages asked for by pollers still running
        self._poll_error: TransportError | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._latest: dict[str, _Receipt] = {}  # message id -> its newest live receipt here
        self._settle_lock = threading.Lock()
        self._acks: list[tuple[str, str]] = []
        self._acker: threading.Thread | None = None
        self._closed = False

    @property
    def _url(self) -> str:
        return self._transport._queue_url(self._name)

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Up to ``max_messages``, long-polling ``ceil(wait_s)`` seconds (20 at most).

        Starts one poller per ten messages wanted (at most ten pollers). Raises ``TransportError``.
        """
        if max_messages < 1:
            return []
        url = self._url  # a missing queue or endpoint fails here, in the caller's thread
        give_up = time.monotonic() + max(wait_s, 0) + 10.0
        launched = False
        with self._cond:
            while True:
                found = self._take(max_messages)
                if found:
                    return found
                if self._poll_error is not None:
                    error, self._poll_error = self._poll_error, None
                    raise error
                if not launched:
                    self._launch(url, max_messages - self._polling, wait_s)
                    launched = True
                remaining = give_up - time.monotonic()
                if self._polling <= 0 or remaining <= 0:
                    return []
                self._cond.wait(remaining)

    def _take(self, count: int) -> list[Delivery]:
        fresh_after = time.monotonic() - self._transport.lease_s / 2  # older ones may already be visible again
        stale = [d for d in self._stash if d.receipt.received_at < fresh_after]
        with self._settle_lock:
            for delivery in stale:
                logger.debug("dropping SQS message %s: held too long unclaimed", delivery.transport_id)
                delivery.receipt.superseded = True
                if self._latest.get(delivery.transport_id) is delivery.receipt:
                    del self._latest[delivery.transport_id]
        kept = [d for d in self._stash if d.receipt.received_at >= fresh_after]
        self._stash = kept[count:]
        return kept[:count]

    def _launch(self, url: str, count: int, wait_s: float) -> None:
        if count <= 0:
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(MAX_POLLERS, thread_name_prefix="hedwig-sqs-poll")
        wait = min(MAX_WAIT_S, _whole_seconds(wait_s))
        # Full batches only, when there is room for one: a remainder waits for the next call, so
        # a caller freeing slots a few at a time does not cost a request per few messages.
        sizes = [BATCH] * min(count // BATCH, MAX_POLLERS) or [count]
        for size in sizes:
            self._polling += size
            self._pool.submit(self._poll, url, size, wait)

    def _poll(self, url: str, size: int, wait: int) -> None:
        deliveries: list[Delivery] = []
        error: TransportError | None = None
        try:
            messages = self._transport._receive_raw(url, size, wait, int(self._transport.lease_s))
            deliveries = [self._delivery(m) for m in messages]
        except TransportError as exc:
            error = exc
        except Exception as exc:  # a bug here must not leave a receive waiting forever
            error = TransportError(f"receive from {self._name} failed: {exc!r}")
        with self._cond:
            self._polling -= size
            closed = self._closed
            if not closed:
                self._stash.extend(deliveries)
                self._poll_error = error or self._poll_error
            self._cond.notify_all()
        if closed and deliveries:
            self.release(deliveries)

    def _delivery(self, message: dict[str, Any]) -> Delivery:
        body, attributes = _unwrap_envelope(str(message["Body"]), _plain_attributes(message.get("MessageAttributes")))
        if DEAD_LETTER_ATTRIBUTE in attributes:  # requeued: restore what the dead-letter info displaced
            attributes, _ = _split_dead_letter(attributes)
        receipt = _Receipt(str(message["ReceiptHandle"]), str(message["MessageId"]), time.monotonic())
        with self._settle_lock:
            previous = self._latest.get(receipt.message_id)
            if previous is not None:
                previous.superseded = True
            self._latest[receipt.message_id] = receipt
        attempt = int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        return Delivery(body.encode(), attributes, attempt, receipt, self._name, receipt.message_id)

    # -- settling -----------------------------------------------------------------------------

    def _claim(self, deliveries: Sequence[Delivery]) -> list[_Receipt]:
        """Mark these settled (under the settle lock); returns the receipts that were still live."""
        live = []
        for delivery in deliveries:
            receipt: _Receipt = delivery.receipt
            if receipt.live:
                receipt.settled = True
                self._latest.pop(receipt.message_id, None)
                live.append(receipt)
            else:
                logger.debug("SQS message %s: receipt already settled or superseded", receipt.message_id)
        return live

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete them, batched with other acks within ``ack_linger_s`` (``close`` flushes)."""
        with self._settle_lock:
            receipts = self._claim(deliveries)
        if not receipts:
            return
        if self._closed:
            self._transport._delete(self._url, [(r.message_id, r.handle) for r in receipts])
            return
        with self._cond:
            self._acks.extend((r.message_id, r.handle) for r in receipts)
            if self._acker is None:
                self._acker = threading.Thread(target=self._ack_loop, name="hedwig-sqs-acker", daemon=True)
                self._acker.start()
            self._cond.notify_all()

    def _ack_loop(self) -> None:
        while True:
            with self._cond:
                while not self._acks and not self._closed:
                    self._cond.wait()
                if not self._acks:
                    return
                if len(self._acks) < BATCH and not self._closed:
                    self._cond.wait(self._transport.ack_linger_s)
                batch, self._acks = self._acks, []
            try:
                self._transport._delete(self._url, batch)
            except TransportError as exc:
                ids = ", ".join(message_id for message_id, _ in batch)
                logger.warning("ack failed, the messages will be redelivered (%s): %s", ids, exc)

    def retry_later(self, delivery: Delivery, delay_s: float) -> None:
        """Hide it for ``delay_s`` (whole seconds, capped at what SQS allows: 12 h from receipt)."""
        receipt: _Receipt = delivery.receipt
        left = MAX_VISIBILITY_S - 5 - _whole_seconds(time.monotonic() - receipt.received_at)
        visibility = min(_whole_seconds(delay_s), left)
        if visibility < _whole_seconds(delay_s):
            logger.warning("SQS message %s: retry delay %.0fs capped at %ds", receipt.message_id, delay_s, visibility)
        with self._settle_lock:
            if not self._claim([delivery]):
                return
            with _boundary(f"retry later in {self._name}"):
                self._transport._client("sqs").change_message_visibility(
                    QueueUrl=self._url, ReceiptHandle=receipt.handle, VisibilityTimeout=visibility
                )

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Make them visible at once (visibility 0), ten a call."""
        with self._settle_lock:
            receipts = self._claim(deliveries)
            self._transport._change_visibility(self._url, [(r.message_id, r.handle) for r in receipts], 0)

    def extend_lease(self, deliveries: Sequence[Delivery], lease_s: float) -> None:
        """Set their visibility to ``lease_s`` from now, ten a call; settled ones are skipped."""
        with self._settle_lock:
            entries = [(d.receipt.message_id, d.receipt.handle) for d in deliveries if d.receipt.live]
            self._transport._change_visibility(self._url, entries, min(MAX_VISIBILITY_S, _whole_seconds(lease_s)))

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Send body, attributes and reason to ``HEDWIG-<queue>-DLQ``, then delete the original."""
        receipt: _Receipt = delivery.receipt
        info = {
            "reason": reason[:MAX_REASON_CHARS],
            "attempts": delivery.attempt,
            "subscription": delivery.subscription,
            "dead_at": round(time.time(), 3),
        }
        attributes = _with_dead_letter(delivery.attributes, info)
        dlq = self._transport._queue_url(self._transport.queue_name(self._queue, dlq=True))
        with self._settle_lock:
            if not receipt.live:
                return
            with _boundary(f"dead-letter SQS message {receipt.message_id} to {dlq}"):
                self._transport._client("sqs").send_message(
                    QueueUrl=dlq, MessageBody=delivery.body.decode(), MessageAttributes=_sqs_attributes(attributes)
                )
            self._claim([delivery])
        self._transport._delete(self._url, [(receipt.message_id, receipt.handle)])

    def close(self) -> None:
        """Flush pending acks and give back messages pollers brought that nobody took."""
        with self._cond:
            self._closed = True
            unclaimed, self._stash = self._stash, []
            self._cond.notify_all()
            acker = self._acker
        if acker is not None:
            acker.join(10.0)
        if unclaimed:
            self.release(unclaimed)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
