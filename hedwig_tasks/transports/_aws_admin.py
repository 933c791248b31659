"""The SNS/SQS transport's provisioning: topics, queues, subscriptions, policies and DLQs.
See ``aws.py`` for the design."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hedwig_tasks.exceptions import TransportError
from hedwig_tasks.transports._aws_common import DLQ_RETENTION_S, POLICY_SID, _boundary, _missing

if TYPE_CHECKING:
    from hedwig_tasks.transports.aws import AWSTransport


# -- provisioning -----------------------------------------------------------------------------


class _Provisioner:
    """Finds what is missing and creates it (or, in a dry run, only says so).

    Whether something exists is asked of the broker each time, never of the transport's
    caches: in a long-running process a queue may have been deleted since it was last seen.
    """

    def __init__(self, transport: AWSTransport, dry_run: bool) -> None:
        self.transport = transport
        self.dry_run = dry_run
        self.sns = transport._client("sns")
        self.sqs = transport._client("sqs")
        self.actions: list[str] = []
        self.urls: dict[str, str] = {}  # queues found or created in this run

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
        if self.find_queue(name) is None:
            created = self.do(
                f"create queue {name} ({what})", lambda: self.sqs.create_queue(QueueName=name, Attributes=attributes)
            )
            if created is not None:
                self.urls[name] = self.transport._queue_urls[name] = str(created["QueueUrl"])
            return arn
        return self.attributes(name, "QueueArn").get("QueueArn", arn)

    def find_queue(self, name: str) -> str | None:
        """The queue's URL as SQS gives it now (also refreshing the transport's cache), or None."""
        try:
            with _boundary(f"provision: look up queue {name}"):
                url = str(self.sqs.get_queue_url(QueueName=name)["QueueUrl"])
        except TransportError as exc:
            if _missing(exc):
                self.transport._queue_urls.pop(name, None)
                return None
            raise
        self.urls[name] = self.transport._queue_urls[name] = url
        return url

    def attributes(self, name: str, *names: str) -> dict[str, str]:
        if name not in self.urls:
            return {}  # planned in a dry run, not created: nothing set yet
        return self.transport._queue_attributes(self.urls[name], *names)

    def set_attributes(self, action: str, name: str, attributes: dict[str, str]) -> None:
        url = self.urls.get(name, "")
        self.do(action, lambda: self.sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes))

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
