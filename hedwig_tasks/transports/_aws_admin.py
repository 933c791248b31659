"""The SNS/SQS transport's administration: provisioning (topics, queues, the DLQ and its redrive
policy, the queue policy, raw-delivery subscriptions) and the dead-letter queue (counting,
listing without removing, requeueing, purging). Both call AWS through the
:class:`~hedwig_tasks.transports._aws_client.AWSClient` they are given. See ``aws.py`` for the design.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from hedwig_tasks.exceptions import ConfigurationError, TransportError
from hedwig_tasks.transports._aws_client import _NAME_RE, AWSClient, aws_errors, missing, queue_name
from hedwig_tasks.transports._aws_wire import (
    BATCH,
    MAX_ATTRIBUTES,
    plain_attributes,
    sent_at,
    split_dead_letter,
    whole,
    with_dead_letter,
)
from hedwig_tasks.transports._plan import Planned
from hedwig_tasks.transports.base import DeadLetterRecord, Progress

__all__ = ["DeadLetterQueue", "Provisioner"]

#: Retention of the dead-letter queue, in seconds (the SQS maximum, 14 days).
DLQ_RETENTION_S = 1209600
#: The queue policy statement provision writes to let SNS deliver.
POLICY_SID = "HedwigTasksSNSDelivery"


# -- provisioning -----------------------------------------------------------------------------


class Provisioner:
    """Finds what is missing and creates it (or, in a dry run, only says so).

    Whether something exists is asked of the broker each time, never of the client's caches:
    in a long-running process a queue may have been deleted since it was last seen. ``plan``
    holds a :class:`Planned` record per action. ``offline`` plans everything as missing
    without a call to AWS (what Terraform is written from); it implies a dry run.
    """

    def __init__(
        self, client: AWSClient, *, lease_s: float, max_receive_count: int, dry_run: bool, offline: bool = False
    ) -> None:
        self.client = client
        self.lease_s = lease_s
        self.max_receive_count = max_receive_count
        self.dry_run = dry_run or offline
        self.offline = offline
        self.plan: list[Planned] = []
        self.urls: dict[str, str] = {}  # queues found or created in this run

    @property
    def actions(self) -> list[str]:
        """A line per action, as a dry run prints them."""
        return [planned.action for planned in self.plan]

    def do(self, planned: Planned, call: Callable[[], Any]) -> Any:
        self.plan.append(planned)
        if not self.dry_run:
            with aws_errors(f"provision: {planned.action}"):
                return call()
        return None

    def topic_arn(self, topic: str) -> str:
        """The topic's ARN; offline, one with ``<region>`` and ``<account>`` standing in."""
        if not self.offline or topic.startswith("arn:"):
            return self.client.topic_arn(topic)
        if not _NAME_RE.match(topic):
            raise ConfigurationError(f"topic {topic!r}: SNS names take letters, digits, '-' and '_'")
        return f"arn:aws:sns:<region>:<account>:hedwig-{topic}"

    def run(self, queue: str | None, subscribe: Sequence[str], publish: Sequence[str]) -> list[str]:
        """Provision; returns a line per action taken (or, in a dry run, that would be taken)."""
        for topic in dict.fromkeys([*publish, *subscribe]):
            self.topic(topic)
        if queue is not None:
            self.queue(queue, list(dict.fromkeys(subscribe)))
        return self.actions

    def topic(self, topic: str) -> None:
        arn = self.topic_arn(topic)
        if topic.startswith("arn:") or self.exists(lambda: self.client.sns.get_topic_attributes(TopicArn=arn)):
            return
        name = sns_name(topic)
        planned = Planned.of("sns_topic", name, f"create topic {topic} (SNS {name})")
        self.do(planned, lambda: self.client.sns.create_topic(Name=name))

    def exists(self, call: Callable[[], Any]) -> bool:
        if self.offline:
            return False
        try:
            with aws_errors("provision: look up"):
                call()
        except TransportError as exc:
            if missing(exc):
                return False
            raise
        return True

    def queue(self, queue: str, topics: list[str]) -> None:
        name, dlq_name = queue_name(queue), queue_name(queue, dlq=True)
        dlq_arn = self.ensure_queue(dlq_name, {"MessageRetentionPeriod": str(DLQ_RETENTION_S)}, "dead letters")
        queue_arn = self.ensure_queue(name, {"VisibilityTimeout": str(int(self.lease_s))}, "messages")
        redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": self.max_receive_count}
        current = self.attributes(name, "RedrivePolicy", "Policy")
        if json.loads(current.get("RedrivePolicy") or "{}").get("deadLetterTargetArn") != dlq_arn:
            action = f"set redrive policy of {name}: to {dlq_name} after {redrive['maxReceiveCount']} receives"
            settings = {"dead_letter_queue": dlq_name, "max_receive_count": self.max_receive_count}
            self.set_attributes(
                Planned.of("sqs_redrive", name, action, settings), name, {"RedrivePolicy": json.dumps(redrive)}
            )
        arns = [self.topic_arn(t) for t in topics]
        self.allow(name, queue_arn, current.get("Policy"), [(t, a) for t, a in zip(topics, arns, strict=True)])
        for topic, arn in zip(topics, arns, strict=True):
            self.subscription(name, queue_arn, topic, arn)

    def ensure_queue(self, name: str, attributes: dict[str, str], what: str) -> str:
        arn = f"arn:aws:sqs:<region>:<account>:{name}" if self.offline else self.client.arn("sqs", name)
        url = None if self.offline else self.client.find_queue_url(name)
        if url is None:
            created = self.do(
                Planned.of("sqs_queue", name, f"create queue {name} ({what})", attributes),
                lambda: self.client.sqs.create_queue(QueueName=name, Attributes=attributes),
            )
            if created is not None:
                self.urls[name] = str(created["QueueUrl"])
                self.client.remember_queue_url(name, self.urls[name])
            return arn
        self.urls[name] = url
        return self.attributes(name, "QueueArn").get("QueueArn", arn)

    def attributes(self, name: str, *names: str) -> dict[str, str]:
        if name not in self.urls:
            return {}  # planned in a dry run, not created: nothing set yet
        return self.client.queue_attributes(self.urls[name], *names)

    def set_attributes(self, planned: Planned, name: str, attributes: dict[str, str]) -> None:
        url = self.urls.get(name, "")
        self.do(planned, lambda: self.client.sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes))

    def allow(self, name: str, queue_arn: str, policy_text: str | None, topics: list[tuple[str, str]]) -> None:
        """Let SNS deliver each topic to the queue, keeping whatever else the policy says."""
        empty: dict[str, Any] = {"Version": "2012-10-17", "Statement": []}
        policy: dict[str, Any] = json.loads(policy_text) if policy_text else empty
        missing_topics = [(t, arn) for t, arn in topics if arn not in json.dumps(policy)]
        if not missing_topics:
            return
        statements = [s for s in policy["Statement"] if s.get("Sid") != POLICY_SID]
        ours = next((s for s in policy["Statement"] if s.get("Sid") == POLICY_SID), None)
        sources = list(ours["Condition"]["ArnEquals"]["aws:SourceArn"]) if ours else []
        sources += [arn for _, arn in missing_topics]
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
        names = ", ".join(t for t, _ in missing_topics)
        added = ",".join(sns_name(t) for t, _ in missing_topics)
        settings = {"sid": POLICY_SID, "topics": added}
        planned = Planned.of("sqs_policy", name, f"allow {names} to deliver to {name} (queue policy)", settings)
        self.set_attributes(planned, name, {"Policy": json.dumps(policy)})

    def subscription(self, name: str, queue_arn: str, topic: str, topic_arn: str) -> None:
        sns = self.client.sns
        found = None if self.offline else self.existing_subscription(topic_arn, queue_arn)
        settings = {"queue": name, "topic": sns_name(topic), "raw_message_delivery": "true"}
        if found is None:
            self.do(
                Planned.of(
                    "sns_subscription",
                    f"{name}/{sns_name(topic)}",
                    f"subscribe {name} to {topic} (raw delivery)",
                    settings,
                ),
                lambda: sns.subscribe(
                    TopicArn=topic_arn,
                    Protocol="sqs",
                    Endpoint=queue_arn,
                    Attributes={"RawMessageDelivery": "true"},
                    ReturnSubscriptionArn=True,
                ),
            )
            return
        with aws_errors(f"provision: read subscription {found}"):
            raw = sns.get_subscription_attributes(SubscriptionArn=found)["Attributes"].get("RawMessageDelivery")
        if raw != "true":
            self.do(
                Planned.of(
                    "sns_subscription",
                    f"{name}/{sns_name(topic)}",
                    f"turn on raw delivery of {topic} to {name}",
                    settings,
                ),
                lambda: sns.set_subscription_attributes(
                    SubscriptionArn=found, AttributeName="RawMessageDelivery", AttributeValue="true"
                ),
            )

    def existing_subscription(self, topic_arn: str, queue_arn: str) -> str | None:
        sns = self.client.sns
        if self.dry_run and not self.exists(lambda: sns.get_topic_attributes(TopicArn=topic_arn)):
            return None
        with aws_errors(f"provision: list subscriptions of {topic_arn}"):
            pages = sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn)
            for page in pages:
                for sub in page.get("Subscriptions", []):
                    if sub.get("Endpoint") == queue_arn and sub.get("Protocol") == "sqs":
                        return str(sub["SubscriptionArn"])
        return None


def sns_name(topic: str) -> str:
    """The SNS topic's name ``hedwig-<topic>``, or the ARN of a topic given as one."""
    return topic if topic.startswith("arn:") else f"hedwig-{topic}"


# -- the dead-letter queue --------------------------------------------------------------------


class DeadLetterQueue:
    """``HEDWIG-<queue>-DLQ``: what is in it, and moving it back to ``HEDWIG-<queue>``."""

    def __init__(self, client: AWSClient, queue: str) -> None:
        self.client = client
        self.name = queue_name(queue, dlq=True)
        self.queue_name = queue_name(queue)

    def count(self) -> int | None:
        """Messages in the DLQ, visible or not; None when it cannot be found."""
        try:
            url = self.client.queue_url(self.name)
        except TransportError:
            return None
        return self._held(url)

    def _held(self, url: str) -> int:
        counts = self.client.queue_attributes(
            url, "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"
        )
        return sum(int(v) for v in counts.values())

    def records(self, limit: int, ids: Collection[str] | None = None) -> list[DeadLetterRecord]:
        """Up to ``limit`` (of ``ids`` only, if given), oldest first, left in place (received, then
        made visible again at once). With ``ids`` the whole DLQ is read to find them."""
        url = self.client.queue_url(self.name)
        seen: dict[str, dict[str, Any]] = {}
        try:
            for messages in self._sample(url, limit if ids is None else self._held(url)):
                seen.update((m["MessageId"], m) for m in messages)
                if ids is not None and len(seen.keys() & set(ids)) >= min(limit, len(ids)):
                    break
        finally:
            entries = [(m["MessageId"], m["ReceiptHandle"]) for m in seen.values()]
            self.client.change_visibility(url, entries, 0)
        chosen = [m for m in seen.values() if ids is None or m["MessageId"] in ids]
        return [self._record(m) for m in sorted(chosen, key=sent_at)][:limit]

    def _sample(self, url: str, limit: int) -> Iterator[list[dict[str, Any]]]:
        """Receive batches until ``limit`` or all the DLQ held at the start were seen."""
        target, found = min(limit, self._held(url)), 0
        while found < target:
            messages = self.client.receive(url, min(BATCH, target - found), 1, 30)
            if not messages:
                return
            found += len(messages)
            yield messages

    def _record(self, message: dict[str, Any]) -> DeadLetterRecord:
        attributes, info = split_dead_letter(plain_attributes(message.get("MessageAttributes")))
        count = whole((message.get("Attributes") or {}).get("ApproximateReceiveCount")) or 1
        dead_at = info.get("dead_at")
        return DeadLetterRecord(
            body=str(message.get("Body", "")).encode("utf-8", "surrogatepass"),
            attributes=attributes,
            reason=str(info.get("reason", "moved by the queue's redrive policy (never settled by a worker)")),
            subscription=str(info.get("subscription", self.queue_name)),
            attempts=whole(info.get("attempts")) or count,
            dead_at=float(dead_at) if isinstance(dead_at, (int, float)) else sent_at(message) / 1000,
            transport_id=str(message.get("MessageId", "")),
        )

    def requeue(self, limit: int | None, progress: Progress | None, ids: Collection[str] | None = None) -> int:
        """Move messages back to the queue (sent, then deleted from the DLQ), ten a call."""
        source = self.client.queue_url(self.name)
        target = self.client.queue_url(self.queue_name)
        return self._settle(source, lambda batch: self._move(source, target, batch), limit, progress, ids)

    def purge(self, limit: int | None, progress: Progress | None, ids: Collection[str] | None = None) -> int:
        """Delete messages from the DLQ for good, ten a call."""
        source = self.client.queue_url(self.name)

        def drop(batch: list[dict[str, Any]]) -> int:
            self.client.delete(source, [(m["MessageId"], m["ReceiptHandle"]) for m in batch])
            return len(batch)

        return self._settle(source, drop, limit, progress, ids)

    def _settle(
        self,
        source: str,
        act: Callable[[list[dict[str, Any]]], int],
        limit: int | None,
        progress: Progress | None,
        ids: Collection[str] | None,
    ) -> int:
        """``act`` on the DLQ's messages (all, or ``ids``), only those there at the start (a
        requeued poison message is not looped); the others are made visible again at the end."""
        ids = None if ids is None else frozenset(ids)
        waiting = self.count() or 0
        total = waiting if limit is None else min(limit, waiting)
        if ids is not None:
            total = min(total, len(ids))
        done, looked, passed = 0, 0, []
        try:
            while done < total and looked < (waiting if ids is not None else total):
                ask = BATCH if ids is not None else min(BATCH, total - done)
                messages = self.client.receive(source, ask, 1, 60)
                if not messages:
                    break
                looked += len(messages)
                chosen = [m for m in messages if ids is None or m["MessageId"] in ids][: total - done]
                taken = {m["ReceiptHandle"] for m in chosen}
                passed += [(m["MessageId"], m["ReceiptHandle"]) for m in messages if m["ReceiptHandle"] not in taken]
                if chosen:
                    done += act(chosen)
                    if progress is not None:
                        progress(done, total)
        finally:
            if passed:
                self.client.change_visibility(source, passed, 0)
        return done

    def _move(self, source: str, target: str, messages: list[dict[str, Any]]) -> int:
        outgoing = []
        for message in messages:
            attributes, _ = split_dead_letter(plain_attributes(message.get("MessageAttributes")))
            if len(attributes) > MAX_ATTRIBUTES:  # keep the displaced ones where the consumer restores them
                attributes = with_dead_letter(attributes, {})
            outgoing.append((message["Body"], attributes))
        result = self.client.send_batch(target, outgoing, doing=f"requeue to {target}")
        sent = {int(ok["Id"]) for ok in result.get("Successful", [])}
        self.client.delete(source, [(m["MessageId"], m["ReceiptHandle"]) for i, m in enumerate(messages) if i in sent])
        if len(sent) < len(messages):
            failed = result.get("Failed", [{}])[0]
            raise TransportError(f"requeue to {target}: {failed.get('Code', '?')}: {failed.get('Message', '')}")
        return len(sent)
