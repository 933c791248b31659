"""The SNS/SQS client that the transport, its consumer and its provisioning share.

It holds the boto3 session and its SNS, SQS and STS clients, each made on first use; the
account, region and partition they settle, and so the ARNs of topics and queues; the queue
URLs, looked up once and cached; the calls the rest make (publish, receive, delete and change
visibility ten a call, send, read queue attributes); SQS's limits on time; and
:func:`aws_errors`, the boundary where botocore's errors become ours. See ``aws.py`` for the design.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.transports._aws_wire import BATCH, sqs_attributes
from hedwig_tasks.transports._boundary import boundary

__all__ = [
    "MAX_POLLERS",
    "MAX_VISIBILITY_S",
    "MAX_WAIT_S",
    "AWSClient",
    "aws_errors",
    "missing",
    "queue_name",
    "whole_seconds",
]

logger = logging.getLogger("hedwig_tasks.transports.aws")  # one logger for the whole transport

#: Longest visibility SQS allows, counted from a receive, in seconds (12 hours).
MAX_VISIBILITY_S = 43200
#: Longest long poll SQS allows, in seconds.
MAX_WAIT_S = 20
#: Most parallel ReceiveMessage calls one consumer makes (and so connections kept per client).
MAX_POLLERS = 10

_AUTH_CODES = frozenset(
    {"InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch", "ExpiredToken", "AccessDenied"}
)
_XML_ERROR_RE = re.compile(r"<Code>([^<]+)</Code>\s*<Message>([^<]*)</Message>")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_RECEIVE_SYSTEM_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp"]
_DRIVER_ERRORS = (BotoCoreError, ClientError)


# -- the boundary -----------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """botocore's error in our words, with a hint where one helps; never the credentials."""
    if isinstance(exc, ClientError):
        code, message = _code_and_message(exc)
        hint = " (check the AWS credentials)" if code in _AUTH_CODES or code == "403" else ""
        return f"{code}: {message}{hint}"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found (environment, profile or role)"
    return str(exc)


def _code_and_message(exc: ClientError) -> tuple[str, str]:
    """Error code and message; read from the body when botocore could not parse it (an XML error
    answering a JSON request, as some emulators send)."""
    info = exc.response.get("Error", {})
    code, message = str(info.get("Code", "?")), str(info.get("Message", exc))
    found = _XML_ERROR_RE.search(message) if code.isdigit() else None
    return (found.group(1), found.group(2)) if found else (code, message)


def aws_errors(doing: str, error: type[TransportError] = TransportError) -> contextlib.AbstractContextManager[None]:
    """The transport boundary: botocore's errors inside become ``error`` saying ``doing``."""
    return boundary(doing, _DRIVER_ERRORS, error=error, describe=_describe)


def missing(exc: BaseException) -> bool:
    """Whether one of our errors says the topic or queue does not exist."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ClientError):
        cause = cause.__cause__
    code = str(cause.response.get("Error", {}).get("Code", "")) if cause is not None else ""
    return code in ("NotFound", "NotFoundException") or "NonExistentQueue" in code or "QueueDoesNotExist" in code


# -- names and time ---------------------------------------------------------------------------


def queue_name(queue: str, *, dlq: bool = False) -> str:
    """``HEDWIG-<queue>`` (or its ``-DLQ``), as authedwig names it from ``HEDWIG_QUEUE``."""
    name = f"HEDWIG-{queue}{'-DLQ' if dlq else ''}"
    if not _NAME_RE.match(queue) or len(f"HEDWIG-{queue}-DLQ") > 80:
        raise ConfigurationError(f"queue {queue!r}: SQS names take letters, digits, '-', '_', 69 at most")
    return name


def whole_seconds(seconds: float) -> int:
    """SQS counts time in whole seconds: ``seconds`` rounded up, 0 at least."""
    return max(0, math.ceil(seconds - 1e-9))


# -- the client -------------------------------------------------------------------------------


class AWSClient:
    """boto3's SNS, SQS and STS clients for one account and region, and the calls made through them.

    Construction does no I/O. Credentials come from the arguments or boto3's usual chain
    (environment, profile, instance role); the region, if not given, from that chain when the
    first client is made, and the account, if not given, from STS when an ARN first needs it.
    Every call raises ``TransportError`` (publishing: ``PublishError``) saying what it was doing.
    """

    def __init__(
        self,
        *,
        region: str | None,
        account_id: str | None,
        profile: str | None,
        credentials: tuple[str | None, str | None, str | None],
        endpoints: Mapping[str, str | None],
        connect_timeout_s: float,
        read_timeout_s: float,
        max_attempts: int,
    ) -> None:
        self.region = region
        self.account_id = account_id
        self.profile = profile
        self.endpoints = dict(endpoints)  #: service ("sns", "sqs", "sts") -> its endpoint URL, None for AWS's
        self._credentials = credentials
        self._timeouts = (float(connect_timeout_s), float(read_timeout_s))
        self._max_attempts = int(max_attempts)
        self._lock = threading.Lock()
        self._session: Any = None
        self._clients: dict[str, Any] = {}
        self._queue_urls: dict[str, str] = {}
        self._topic_arns: dict[tuple[str, str | None], str] = {}
        self._partition: str | None = None

    def __repr__(self) -> str:
        return f"<AWSClient region={self.region!r} account={self.account_id!r}>"

    # -- boto3's clients ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether any of boto3's clients has been made yet."""
        return bool(self._clients)

    @property
    def sns(self) -> Any:
        """boto3's SNS client (made on first use), for calls this class does not make itself."""
        return self._client("sns")

    @property
    def sqs(self) -> Any:
        """boto3's SQS client (made on first use), for calls this class does not make itself."""
        return self._client("sqs")

    def _client(self, service: str) -> Any:
        client = self._clients.get(service)
        if client is None:
            with self._lock:
                client = self._clients.get(service) or self._make(service)
                self._clients[service] = client
        return client

    def _make(self, service: str) -> Any:
        """A client of ``service``; called under the lock."""
        if self._session is None:
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
            self.region, self._session = session.region_name, session
        connect_timeout, read_timeout = self._timeouts
        if service == "sqs":
            read_timeout = max(read_timeout, MAX_WAIT_S + 10)  # longer than the longest long poll
        config = Config(
            retries={"mode": "standard", "total_max_attempts": self._max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=MAX_POLLERS + 10,
        )
        return self._session.client(service, endpoint_url=self.endpoints.get(service), config=config)

    def close(self) -> None:
        """Drop the clients (and the session); the next call makes new ones."""
        with self._lock:
            clients, self._clients, self._session = self._clients, {}, None
        for client in clients.values():
            client.close()

    # -- account and names --------------------------------------------------------------------

    def account(self) -> str:
        """The account id: as given, or asked of STS once."""
        if self.account_id is None:
            with aws_errors("finding the AWS account (sts GetCallerIdentity)"):
                self.account_id = str(self._client("sts").get_caller_identity()["Account"])
        return self.account_id

    def arn(self, service: str, name: str, owner: str | None = None) -> str:
        """The ARN of ``service``'s resource ``name`` in ``owner``'s account (ours by default)."""
        if self._partition is None:
            self._client("sns")  # settles the region
            self._partition = boto3.session.Session().get_partition_for_region(self.region or "us-east-1")
        return f"arn:{self._partition}:{service}:{self.region}:{owner or self.account()}:{name}"

    def topic_arn(self, topic: str, owner: str | None = None) -> str:
        """The SNS topic ``hedwig-<topic>`` in ``owner``'s account (ours by default), or a full ARN."""
        if topic.startswith("arn:"):
            return topic
        arn = self._topic_arns.get((topic, owner))
        if arn is None:
            if not _NAME_RE.match(topic):
                raise ConfigurationError(f"topic {topic!r}: SNS names take letters, digits, '-' and '_'")
            arn = self._topic_arns[(topic, owner)] = self.arn("sns", f"hedwig-{topic}", owner)
        return arn

    # -- queue URLs ---------------------------------------------------------------------------

    def queue_url(self, name: str) -> str:
        """The URL of SQS queue ``name``, asked of SQS once and then cached.

        Raises ``TransportError`` saying to provision when there is no such queue.
        """
        url = self._queue_urls.get(name)
        if url is not None:
            return url
        try:
            return self._ask_queue_url(name)
        except TransportError as exc:
            if missing(exc):
                raise TransportError(f"SQS queue {name} does not exist; run `hedwig-tasks provision`") from exc
            raise

    def find_queue_url(self, name: str) -> str | None:
        """The queue's URL as SQS gives it now, never the cache (which it refreshes), or None."""
        try:
            return self._ask_queue_url(name)
        except TransportError as exc:
            if missing(exc):
                self._queue_urls.pop(name, None)
                return None
            raise

    def remember_queue_url(self, name: str, url: str) -> None:
        """Cache the URL of a queue just created."""
        self._queue_urls[name] = url

    def _ask_queue_url(self, name: str) -> str:
        with aws_errors(f"finding SQS queue {name}"):
            url = str(self.sqs.get_queue_url(QueueName=name)["QueueUrl"])
        self._queue_urls[name] = url
        return url

    def queue_attributes(self, url: str, *names: str) -> dict[str, str]:
        """The named attributes of the queue at ``url`` (GetQueueAttributes)."""
        with aws_errors(f"reading attributes of {url}"):
            found = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(names))
        return dict(found.get("Attributes", {}))

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, arn: str, text: str, attributes: Mapping[str, str], *, doing: str) -> str:
        """SNS Publish; returns the message id. Raises ``PublishError`` saying ``doing``."""
        with aws_errors(doing, PublishError):
            sent = self.sns.publish(TopicArn=arn, Message=text, MessageAttributes=sqs_attributes(attributes))
        return str(sent["MessageId"])

    def publish_batch(
        self, arn: str, entries: Mapping[str, tuple[str, Mapping[str, str]]], *, doing: str
    ) -> dict[str, Any]:
        """SNS PublishBatch of ``{entry id: (text, attributes)}``, ten at most; returns SNS's answer
        (``Successful`` and ``Failed`` entries). Raises ``PublishError`` saying ``doing``."""
        request = [
            {"Id": key, "Message": text, "MessageAttributes": sqs_attributes(attributes)}
            for key, (text, attributes) in entries.items()
        ]
        with aws_errors(doing, PublishError):
            return dict(self.sns.publish_batch(TopicArn=arn, PublishBatchRequestEntries=request))

    # -- SQS messages -------------------------------------------------------------------------

    def receive(self, url: str, count: int, wait_s: int, visibility_s: int) -> list[dict[str, Any]]:
        """ReceiveMessage: up to ``count`` (ten at most), hidden for ``visibility_s``, with every
        message attribute and the receive count and sent time."""
        with aws_errors(f"receive from {url}"):
            found = self.sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=wait_s,
                VisibilityTimeout=visibility_s,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=_RECEIVE_SYSTEM_ATTRIBUTES,
            )
        return list(found.get("Messages", []))

    def delete(self, url: str, entries: Sequence[tuple[str, str]]) -> None:
        """DeleteMessageBatch, ten a call; entries are (message id, receipt handle).

        An entry SQS refuses is logged, not raised: its message comes back when its lease runs out.
        """
        for chunk in _chunks(entries):
            request = [{"Id": str(i), "ReceiptHandle": handle} for i, (_, handle) in enumerate(chunk)]
            with aws_errors(f"deleting messages from {url}"):
                result = self.sqs.delete_message_batch(QueueUrl=url, Entries=request)
            _log_failures("delete", chunk, result)

    def change_visibility(self, url: str, entries: Sequence[tuple[str, str]], visibility_s: int) -> None:
        """ChangeMessageVisibilityBatch, ten a call; entries are (message id, receipt handle).

        An entry SQS refuses is logged, not raised.
        """
        for chunk in _chunks(entries):
            request = [
                {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": visibility_s}
                for i, (_, handle) in enumerate(chunk)
            ]
            with aws_errors(f"change visibility in {url}"):
                result = self.sqs.change_message_visibility_batch(QueueUrl=url, Entries=request)
            _log_failures("change visibility", chunk, result)

    def set_visibility(self, url: str, handle: str, visibility_s: int, *, doing: str) -> None:
        """ChangeMessageVisibility of one receipt; a refusal raises, saying ``doing``."""
        with aws_errors(doing):
            self.sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=visibility_s)

    def send(self, url: str, body: str, attributes: Mapping[str, str], *, doing: str, delay_s: int = 0) -> None:
        """SendMessage of one message, hidden for ``delay_s`` (900 at most); a failure raises, saying ``doing``."""
        with aws_errors(doing):
            self.sqs.send_message(
                QueueUrl=url, MessageBody=body, MessageAttributes=sqs_attributes(attributes), DelaySeconds=delay_s
            )

    def send_batch(self, url: str, messages: Sequence[tuple[str, Mapping[str, str]]], *, doing: str) -> dict[str, Any]:
        """SendMessageBatch of (body, attributes), ten at most, entry ids their indexes; returns
        SQS's answer (``Successful`` and ``Failed`` entries). A failed call raises, saying ``doing``."""
        entries = []
        for index, (body, attributes) in enumerate(messages):
            entry: dict[str, Any] = {"Id": str(index), "MessageBody": body}
            if attributes:
                entry["MessageAttributes"] = sqs_attributes(attributes)
            entries.append(entry)
        with aws_errors(doing):
            return dict(self.sqs.send_message_batch(QueueUrl=url, Entries=entries))


def _chunks(entries: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(entries), BATCH):
        yield entries[start : start + BATCH]


def _log_failures(what: str, chunk: Sequence[tuple[str, str]], result: Mapping[str, Any]) -> None:
    for failure in result.get("Failed", []):
        message_id = chunk[int(failure["Id"])][0]
        # A receipt of a message already deleted (or received again elsewhere) is expected now and then.
        level = logging.DEBUG if failure.get("Code") == "ReceiptHandleIsInvalid" else logging.WARNING
        logger.log(level, "%s of SQS message %s failed: %s", what, message_id, failure.get("Message", ""))
