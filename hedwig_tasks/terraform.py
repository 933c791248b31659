"""``hedwig-tasks provision --terraform DIR``: what ``provision`` would create, as Terraform.

The resources come from the provisioner's own plan, run offline (everything planned as
missing, nothing asked of the cloud): the records ``provision --dry-run`` prints on an empty
account or project are the records rendered here, one Terraform resource each (the SQS queue
policy adds the ``aws_iam_policy_document`` it is written from). One module per app, in
``DIR/<app name>/``: ``main.tf`` (the resources), ``variables.tf`` (``account_id`` and
``region`` on AWS, ``project`` and ``region`` on Google Cloud, defaulted from the transport's
settings where they name them), ``outputs.tf`` (ARNs, URLs, ids) and ``versions.tf`` (the
provider and its configuration). AWS (``aws://``) and Google Cloud (``gcp://``) only; any
other transport raises ``ConfigurationError``. The output is rendered already formatted as
``terraform fmt`` writes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hedwig_tasks.exceptions import ConfigurationError
from hedwig_tasks.transports._plan import Plan, Planned, offline_plan

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig

__all__ = ["Attr", "Block", "plan", "render", "write"]

#: The provider versions the modules ask for (the resources used exist in these and later).
AWS_PROVIDER = ">= 4.0"
GOOGLE_PROVIDER = ">= 4.0"
#: SQS attribute -> ``aws_sqs_queue`` argument, for every attribute provision sets on a queue.
SQS_ARGUMENTS = {
    "MessageRetentionPeriod": "message_retention_seconds",
    "VisibilityTimeout": "visibility_timeout_seconds",
}


# -- the plan ---------------------------------------------------------------------------------


def plan(app: Hedwig) -> Plan:
    """What ``app.provision()`` would create on an empty account or project, as records.

    Raises ``ConfigurationError`` naming the transport when it is neither AWS nor Google Cloud.
    """
    subscribe = app.subscribed_topics()
    queue = app.queue if subscribe else None
    return offline_plan(app.transport, queue, subscribe, app.published_topics())


# -- HCL, written as terraform fmt writes it -----------------------------------------------------


@dataclass(frozen=True)
class Attr:
    """``key = value``; ``value`` is an HCL expression, already written (it may span lines)."""

    key: str
    value: str


@dataclass(frozen=True)
class Block:
    """``type "label" ... { body }``."""

    type: str
    labels: tuple[str, ...] = ()
    body: tuple[Attr | Block, ...] = ()


def render(blocks: Iterable[Block], header: str = "") -> str:
    """Top-level blocks, a blank line between them, after ``header`` (comment lines)."""
    parts = [header] if header else []
    parts += ["\n".join(_block(block, 0)) + "\n" for block in blocks]
    return "\n".join(parts)


def _block(block: Block, depth: int) -> list[str]:
    pad = "  " * depth
    opening = " ".join([block.type, *(json.dumps(label) for label in block.labels), "{"])
    lines = [pad + opening]
    for run in _runs(block.body):
        if isinstance(run, Block):
            lines += _block(run, depth + 1)
        else:
            width = max(len(attr.key) for attr in run) if len(run) > 1 else 0
            for attr in run:
                first, *rest = attr.value.split("\n")
                lines.append(f"{pad}  {attr.key.ljust(width)} = {first}")
                lines += [f"{pad}  {line}" for line in rest]
    return [*lines, pad + "}"]


def _runs(body: Sequence[Attr | Block]) -> list[Block | list[Attr]]:
    """Blocks alone, and runs of one-line attributes (which fmt aligns); a multi-line one alone."""
    runs: list[Block | list[Attr]] = []
    for item in body:
        one_line = isinstance(item, Attr) and "\n" not in item.value
        last = runs[-1] if runs else None
        if one_line and isinstance(last, list) and "\n" not in last[-1].value:
            last.append(item)  # type: ignore[arg-type]
        else:
            runs.append(item if isinstance(item, Block) else [item])
    return runs


def string(text: str) -> str:
    """An HCL string literal (``${`` and ``%{`` escaped)."""
    return json.dumps(text).replace("${", "$${").replace("%{", "%%{")


def label(name: str) -> str:
    """A Terraform identifier for a resource named ``name``."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    return cleaned if re.match(r"[A-Za-z_]", cleaned) else f"_{cleaned}"


def mapping(pairs: Iterable[tuple[str, str]]) -> str:
    """A multi-line map of string keys to expressions, keys aligned."""
    pairs = list(pairs)
    if not pairs:
        return "{}"
    width = max(len(string(key)) for key, _ in pairs)
    return "\n".join(["{", *(f"  {string(key).ljust(width)} = {value}" for key, value in pairs), "}"])


def variable(name: str, description: str, default: str | None, *, optional: bool = False) -> Block:
    body: list[Attr] = [Attr("description", string(description)), Attr("type", "string")]
    if default is not None or optional:
        body.append(Attr("default", string(default) if default is not None else "null"))
    return Block("variable", (name,), tuple(body))


def output(name: str, description: str, value: str) -> Block:
    return Block("output", (name,), (Attr("description", string(description)), Attr("value", value)))


# -- AWS --------------------------------------------------------------------------------------


def _aws_resources(records: Sequence[Planned]) -> tuple[list[Block], list[Block]]:
    """The resources and the outputs of an AWS plan."""
    topics = {r.name: f"aws_sns_topic.{label(r.name)}.arn" for r in records if r.kind == "sns_topic"}
    blocks = [block for record in records for block in _aws_blocks(record, topics)]
    subscriptions = [
        (r.name, f"aws_sns_topic_subscription.{label(r.name)}.arn") for r in records if r.kind == "sns_subscription"
    ]
    outputs = [output("topic_arns", "SNS topic name -> ARN", mapping(topics.items()))]
    for name in (r.name for r in records if r.kind == "sqs_queue"):
        what = "dead_letter_queue" if name.endswith("-DLQ") else "queue"
        outputs.append(output(f"{what}_url", f"URL of SQS queue {name}", _queue(name, "id")))
        outputs.append(output(f"{what}_arn", f"ARN of SQS queue {name}", _queue(name, "arn")))
    outputs.append(output("subscription_arns", "queue/topic -> subscription ARN", mapping(subscriptions)))
    return blocks, outputs


def _queue(name: str, what: str) -> str:
    return f"aws_sqs_queue.{label(name)}.{what}"


def _aws_blocks(record: Planned, topics: dict[str, str]) -> list[Block]:
    """The Terraform of one record; ``topics``: the plan's topics -> their ARN's expression."""

    def topic_arn(name: str) -> str:
        return topics.get(name) or string(name)  # another account's topic, given by its ARN

    resource = ("resource", label(record.name))
    if record.kind == "sns_topic":
        return [Block(resource[0], ("aws_sns_topic", resource[1]), (Attr("name", string(record.name)),))]
    if record.kind == "sqs_queue":
        settings = [Attr(SQS_ARGUMENTS[key], value) for key, value in record.settings]
        return [Block(resource[0], ("aws_sqs_queue", resource[1]), (Attr("name", string(record.name)), *settings))]
    if record.kind == "sqs_redrive":
        dlq = _queue(str(record.get("dead_letter_queue")), "arn")
        policy = f"jsonencode({{ deadLetterTargetArn = {dlq}, maxReceiveCount = {record.get('max_receive_count')} }})"
        redrive = (Attr("queue_url", _queue(record.name, "id")), Attr("redrive_policy", policy))
        return [Block(resource[0], ("aws_sqs_queue_redrive_policy", resource[1]), redrive)]
    if record.kind == "sqs_policy":
        sources = [topic_arn(t) for t in str(record.get("topics")).split(",")]
        return _aws_queue_policy(record, _queue(record.name, "arn"), _queue(record.name, "id"), sources)
    if record.kind == "sns_subscription":
        body = (
            Attr("topic_arn", topic_arn(str(record.get("topic")))),
            Attr("protocol", string("sqs")),
            Attr("endpoint", _queue(str(record.get("queue")), "arn")),
            Attr("raw_message_delivery", "true"),
        )
        return [Block(resource[0], ("aws_sns_topic_subscription", resource[1]), body)]
    raise ConfigurationError(f"provision --terraform: no Terraform for an AWS {record.kind}")


def _aws_queue_policy(record: Planned, queue_arn: str, queue_url: str, sources: list[str]) -> list[Block]:
    """The queue policy statement provision writes (``HedwigTasksSNSDelivery``), and its resource."""
    name = record.name
    statement = Block(
        "statement",
        body=(
            Attr("sid", string(str(record.get("sid")))),
            Attr("effect", string("Allow")),
            Attr("actions", "[" + string("sqs:SendMessage") + "]"),
            Attr("resources", f"[{queue_arn}]"),
            Block("principals", body=(Attr("type", string("Service")), Attr("identifiers", '["sns.amazonaws.com"]'))),
            Block(
                "condition",
                body=(
                    Attr("test", string("ArnEquals")),
                    Attr("variable", string("aws:SourceArn")),
                    Attr("values", "[" + ", ".join(sources) + "]"),
                ),
            ),
        ),
    )
    document = Block("data", ("aws_iam_policy_document", label(name)), (statement,))
    policy = f"data.aws_iam_policy_document.{label(name)}.json"
    resource = Block(
        "resource", ("aws_sqs_queue_policy", label(name)), (Attr("queue_url", queue_url), Attr("policy", policy))
    )
    return [document, resource]


def _aws_module(app: Hedwig, records: Sequence[Planned], known: dict[str, str | None]) -> dict[str, str]:
    resources, outputs = _aws_resources(records)
    provider = Block(
        "provider", ("aws",), (Attr("region", "var.region"), Attr("allowed_account_ids", "[var.account_id]"))
    )
    variables = [
        variable("account_id", "the AWS account the resources are made in", known.get("account_id")),
        variable("region", "the AWS region the resources are made in", known.get("region")),
    ]
    return {
        "versions.tf": render([_required("aws", "hashicorp/aws", AWS_PROVIDER), provider]),
        "variables.tf": render(variables),
        "main.tf": render(resources, _header(app)),
        "outputs.tf": render(outputs),
    }


# -- Google Cloud -----------------------------------------------------------------------------


def _gcp_resources(records: Sequence[Planned]) -> tuple[list[Block], list[Block]]:
    """The resources and the outputs of a Pub/Sub plan."""
    project = Attr("project", "var.project")
    topics = {r.name: f"google_pubsub_topic.{label(r.name)}.id" for r in records if r.kind == "pubsub_topic"}
    blocks: list[Block] = []
    subscriptions: list[tuple[str, str]] = []
    for record in records:
        if record.kind == "pubsub_topic":
            body: tuple[Attr | Block, ...] = (project, Attr("name", string(record.name)))
            blocks.append(Block("resource", ("google_pubsub_topic", label(record.name)), body))
        elif record.kind == "pubsub_subscription":
            blocks.append(_gcp_subscription(record, project, topics))
            subscriptions.append((record.name, f"google_pubsub_subscription.{label(record.name)}.id"))
        else:
            raise ConfigurationError(f"provision --terraform: no Terraform for a Pub/Sub {record.kind}")
    outputs = [
        output("topic_ids", "Pub/Sub topic name -> id (projects/.../topics/...)", mapping(topics.items())),
        output("subscription_ids", "subscription name -> id", mapping(subscriptions)),
    ]
    return blocks, outputs


def _gcp_subscription(record: Planned, project: Attr, topics: dict[str, str]) -> Block:
    get: Callable[[str], str | None] = record.get
    topic = str(get("topic"))
    body: list[Attr | Block] = [
        project,
        Attr("name", string(record.name)),
        Attr("topic", topics.get(topic) or string(topic)),  # another project's topic, by its path
        Attr("ack_deadline_seconds", str(get("ack_deadline_seconds"))),
    ]
    if get("message_retention_seconds") is not None:
        body.append(Attr("message_retention_duration", string(f"{get('message_retention_seconds')}s")))
    if get("dead_letter_topic") is not None:
        dead = (
            Attr("dead_letter_topic", topics[str(get("dead_letter_topic"))]),
            Attr("max_delivery_attempts", str(get("max_delivery_attempts"))),
        )
        body.append(Block("dead_letter_policy", body=dead))
    if get("minimum_backoff_seconds") is not None:
        backoff = (
            Attr("minimum_backoff", string(f"{get('minimum_backoff_seconds')}s")),
            Attr("maximum_backoff", string(f"{get('maximum_backoff_seconds')}s")),
        )
        body.append(Block("retry_policy", body=backoff))
    return Block("resource", ("google_pubsub_subscription", label(record.name)), tuple(body))


def _gcp_module(app: Hedwig, records: Sequence[Planned], known: dict[str, str | None]) -> dict[str, str]:
    resources, outputs = _gcp_resources(records)
    provider = Block("provider", ("google",), (Attr("project", "var.project"), Attr("region", "var.region")))
    variables = [
        variable("project", "the Google Cloud project the resources are made in", known.get("project")),
        variable("region", "the provider's default region (Pub/Sub resources are global)", None, optional=True),
    ]
    return {
        "versions.tf": render([_required("google", "hashicorp/google", GOOGLE_PROVIDER), provider]),
        "variables.tf": render(variables),
        "main.tf": render(resources, _header(app)),
        "outputs.tf": render(outputs),
    }


# -- the module -------------------------------------------------------------------------------


def _required(name: str, source: str, version: str) -> Block:
    provider = f"{{\n  source  = {string(source)}\n  version = {string(version)}\n}}"
    return Block("terraform", body=(Block("required_providers", body=(Attr(name, provider),)),))


def _header(app: Hedwig) -> str:
    return (
        f"# Written by `hedwig-tasks provision --terraform` for app {app.name!r} (queue {app.queue!r}):\n"
        "# what `hedwig-tasks provision` creates on an empty account or project, one resource\n"
        "# per line of `hedwig-tasks provision --dry-run`. Regenerate rather than edit.\n"
    )


def module(app: Hedwig) -> dict[str, str]:
    """The app's module: file name -> text. Raises ``ConfigurationError`` off AWS and Google Cloud."""
    planned = plan(app)
    render_module = _aws_module if planned.provider == "aws" else _gcp_module
    return render_module(app, planned.records, dict(planned.variables))


def write(app: Hedwig, directory: str | Path) -> Path:
    """Write the app's module to ``directory/<app name>/``; returns that folder."""
    files = module(app)
    folder = Path(directory) / label(app.name)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder
