"""``provision --terraform``: the module describes exactly the plan ``provision --dry-run`` makes.

On moto and the Pub/Sub emulator, with names of the test's own (so nothing exists yet), the
records of a real dry run equal the offline plan the module is written from, the dry run's
lines are those records' lines, and the resources read back from the written files by an HCL
parser (python-hcl2) are those records again, resource for resource. ``terraform fmt -check``
passes on what is written; other transports are refused by name.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from aws_server import ACCOUNT, aws_transport, moto_url  # noqa: F401
from cli_helpers import cli, one_error, project
from gcp_server import emulator_host, gcp_transport  # noqa: F401
from gcp_server import tag as gcp_tag

from hedwig_tasks import Hedwig, terraform
from hedwig_tasks.transports._aws_admin import Provisioner as AWSProvisioner
from hedwig_tasks.transports._gcp_admin import Provisioner as GCPProvisioner
from hedwig_tasks.transports._plan import Planned

hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 (a test dependency) reads the Terraform back")

SCHEMA = Path(__file__).parent / "schemas" / "schema.json"
#: What a reader of a Terraform resource returns: a plan record's kind, name and settings.
Read = tuple[str, str, Mapping[str, object]]
FOREIGN_ARN = f"arn:aws:sns:us-east-1:{ACCOUNT[:-1]}9:hedwig-elsewhere"


def aws_app(url: str, suffix: str, *foreign: str) -> Hedwig:
    topics = [f"uc-{suffix}", f"mail-{suffix}"]
    return Hedwig(
        f"tf-{suffix}",
        schema=SCHEMA,
        transport=aws_transport(url, lease_s=45, max_receive_count=4),
        routing={"user-created": topics[0], "send_email": topics[1]},
        subscriptions=[*topics, *foreign],
    )


def gcp_app(host: str, suffix: str) -> Hedwig:
    transport = gcp_transport(
        host,
        lease_s=40,
        max_delivery_attempts=6,
        retry_min_backoff_s=5,
        retry_max_backoff_s=120,
        subscriptions=[(f"far-{suffix}", "other-project")],
    )
    topics = [f"uc-{suffix}", f"mail-{suffix}"]
    return Hedwig(
        f"tf-{suffix}",
        schema=SCHEMA,
        transport=transport,
        routing={"user-created": topics[0], "send_email": topics[1]},
        subscriptions=[topics[0], f"far-{suffix}"],
    )


def dry_run_records(app: Hedwig) -> list[Planned]:
    """The records of a real dry run against the broker (what ``provision --dry-run`` prints)."""
    transport: Any = app.transport
    subscribe, publish = app.subscribed_topics(), app.published_topics()
    if transport.scheme == "aws":
        aws = AWSProvisioner(
            transport.client, lease_s=transport.lease_s, max_receive_count=transport.max_receive_count, dry_run=True
        )
        aws.run(app.queue, subscribe, publish)
        return aws.plan
    gcp = GCPProvisioner(
        transport.client,
        lease_s=transport.lease_s,
        max_delivery_attempts=transport.max_delivery_attempts,
        retry_backoff_s=transport.retry_backoff_s,
        dry_run=True,
    )
    gcp.run(app.queue, subscribe, publish)
    return gcp.plan


# -- reading the written Terraform back -------------------------------------------------------


def unquote(text: str) -> str:
    return text[1:-1] if text.startswith('"') and text.endswith('"') else text


class Module:
    """The resources of a written module, read with python-hcl2, as plan records."""

    def __init__(self, folder: Path) -> None:
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.data: dict[tuple[str, str], dict[str, Any]] = {}
        for path in sorted(folder.glob("*.tf")):
            with path.open() as file:
                parsed = hcl2.load(file)
            for section, into in (("resource", self.resources), ("data", self.data)):
                for entry in parsed.get(section, []):
                    for kind, named in entry.items():
                        for name, body in named.items():
                            into[(unquote(kind), unquote(name))] = body

    def value(self, raw: Any) -> str:
        """A literal as its text; a reference ``${type.label.attr}`` as the name of what it names."""
        if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}"):
            kind, name, _ = raw[2:-1].split(".")
            return unquote(self.resources[(kind, name)]["name"])
        return unquote(raw) if isinstance(raw, str) else json.dumps(raw)

    def records(self) -> list[Planned]:
        return [self.record(kind, body) for (kind, _), body in self.resources.items()]

    def record(self, kind: str, body: dict[str, Any]) -> Planned:
        reader = getattr(self, kind)
        kind_name_settings: Read = reader(body)
        return Planned.of(*kind_name_settings[:2], "", kind_name_settings[2])

    def aws_sns_topic(self, body: dict[str, Any]) -> Read:
        return "sns_topic", self.value(body["name"]), {}

    def aws_sqs_queue(self, body: dict[str, Any]) -> Read:
        back = {argument: attribute for attribute, argument in terraform.SQS_ARGUMENTS.items()}
        settings = {back[k]: self.value(v) for k, v in body.items() if k in back}
        return "sqs_queue", self.value(body["name"]), settings

    def queue_of(self, url: str) -> str:
        kind, name, attribute = url[2:-1].split(".")
        assert (kind, attribute) == ("aws_sqs_queue", "id")
        return unquote(self.resources[(kind, name)]["name"])

    def aws_sqs_queue_redrive_policy(self, body: dict[str, Any]) -> Read:
        found = re.fullmatch(
            r"\$\{jsonencode\(\{ *deadLetterTargetArn = (\S+?), *maxReceiveCount = (\d+) *\}\)\}",
            body["redrive_policy"],
        )
        assert found, body["redrive_policy"]
        settings = {"dead_letter_queue": self.value("${" + found.group(1) + "}"), "max_receive_count": found.group(2)}
        return "sqs_redrive", self.queue_of(body["queue_url"]), settings

    def aws_sqs_queue_policy(self, body: dict[str, Any]) -> Read:
        _, kind, name, _ = body["policy"][2:-1].split(".")
        (statement,) = self.data[(kind, name)]["statement"]
        (condition,) = statement["condition"]
        (principals,) = statement["principals"]
        assert [self.value(a) for a in statement["actions"]] == ["sqs:SendMessage"]
        assert [self.value(i) for i in principals["identifiers"]] == ["sns.amazonaws.com"]
        assert (self.value(condition["test"]), self.value(condition["variable"])) == ("ArnEquals", "aws:SourceArn")
        assert statement["resources"] == [body["queue_url"].replace(".id}", ".arn}")]
        topics = ",".join(self.value(t) for t in condition["values"])
        return "sqs_policy", self.queue_of(body["queue_url"]), {"sid": self.value(statement["sid"]), "topics": topics}

    def aws_sns_topic_subscription(self, body: dict[str, Any]) -> Read:
        assert (self.value(body["protocol"]), body["raw_message_delivery"]) == ("sqs", True)
        queue, topic = self.value(body["endpoint"]), self.value(body["topic_arn"])
        settings = {"queue": queue, "topic": topic, "raw_message_delivery": "true"}
        return "sns_subscription", f"{queue}/{topic}", settings

    def google_pubsub_topic(self, body: dict[str, Any]) -> Read:
        assert body["project"] == "${var.project}"
        return "pubsub_topic", self.value(body["name"]), {}

    def google_pubsub_subscription(self, body: dict[str, Any]) -> Read:
        assert body["project"] == "${var.project}"
        settings: dict[str, object] = {
            "topic": self.value(body["topic"]),
            "ack_deadline_seconds": self.value(body["ack_deadline_seconds"]),
        }
        if "message_retention_duration" in body:
            settings["message_retention_seconds"] = self.value(body["message_retention_duration"]).removesuffix("s")
        for policy in body.get("dead_letter_policy", []):
            settings["dead_letter_topic"] = self.value(policy["dead_letter_topic"])
            settings["max_delivery_attempts"] = self.value(policy["max_delivery_attempts"])
        for policy in body.get("retry_policy", []):
            settings["minimum_backoff_seconds"] = self.value(policy["minimum_backoff"]).removesuffix("s")
            settings["maximum_backoff_seconds"] = self.value(policy["maximum_backoff"]).removesuffix("s")
        return "pubsub_subscription", self.value(body["name"]), settings


def assert_same_plan(app: Hedwig, tmp_path: Path) -> list[Planned]:
    """The dry run's records, the offline plan's and the written module's are the same."""
    dry = dry_run_records(app)
    offline = list(terraform.plan(app).records)
    assert offline == dry
    assert app.provision(dry_run=True) == [record.action for record in dry]
    folder = terraform.write(app, tmp_path)
    assert sorted(Module(folder).records(), key=repr) == sorted(dry, key=repr)
    return dry


def test_aws_module_is_the_dry_run_plan(moto_url: str, tmp_path: Path) -> None:
    app = aws_app(moto_url, gcp_tag())
    try:
        dry = assert_same_plan(app, tmp_path)
        kinds = [record.kind for record in dry]
        assert kinds.count("sns_topic") == 2 and kinds.count("sns_subscription") == 2
        assert {"sqs_queue", "sqs_redrive", "sqs_policy"} <= set(kinds)
        app.provision()
        assert app.provision(dry_run=True) == []  # what the module describes is what provision made
    finally:
        app.close()


def test_gcp_module_is_the_dry_run_plan(emulator_host: str, tmp_path: Path) -> None:
    app = gcp_app(emulator_host, gcp_tag())
    try:
        dry = assert_same_plan(app, tmp_path)
        foreign = [r for r in dry if r.kind == "pubsub_subscription" and "far-" in r.name]
        assert [r.get("topic") for r in foreign] == [f"projects/other-project/topics/hedwig-far-{app.name[3:]}"]
        assert {r.get("max_delivery_attempts") for r in dry if r.get("dead_letter_topic")} == {"6"}
    finally:
        app.close()


def test_aws_module_subscribes_to_another_accounts_topic_by_its_arn(tmp_path: Path) -> None:
    """Offline (moto cannot hold another account's topic): the module reads back as the plan."""
    app = aws_app("http://127.0.0.1:9", "offline", FOREIGN_ARN)  # never called
    try:
        planned = list(terraform.plan(app).records)
        module = Module(terraform.write(app, tmp_path))
        assert sorted(module.records(), key=repr) == sorted(planned, key=repr)
        (policy,) = [r for r in planned if r.kind == "sqs_policy"]
        assert policy.get("topics") == f"hedwig-uc-offline,hedwig-mail-offline,{FOREIGN_ARN}"
        assert f'topic_arn            = "{FOREIGN_ARN}"' in (tmp_path / app.name / "main.tf").read_text()
    finally:
        app.close()


@pytest.mark.skipif(shutil.which("terraform") is None, reason="the terraform binary is not installed")
def test_terraform_fmt_accepts_the_modules(tmp_path: Path) -> None:
    for scheme, url in (("aws", f"aws://?region=eu-west-1&account_id={ACCOUNT}"), ("gcp", "gcp://some-project")):
        app = Hedwig("fmt-app", schema=SCHEMA, transport=url, subscriptions=["a-topic", "b-topic"])
        terraform.write(app, tmp_path / scheme)
        app.close()
    result = subprocess.run(
        ["terraform", "fmt", "-check", "-recursive", "-diff", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    variables = (tmp_path / "aws" / "fmt-app" / "variables.tf").read_text()
    assert '"eu-west-1"' in variables and f'"{ACCOUNT}"' in variables


def test_cli_writes_the_module_and_refuses_other_transports(tmp_path: Path) -> None:
    folder = project(tmp_path)
    refused = cli(folder, "provision", "-A", "tasks", "--terraform", "tf")
    assert refused.returncode == 1
    assert "'sqlite' transport has no Terraform" in one_error(refused)
    assert not (folder / "tf").exists()
    url = f"aws://?region=us-east-1&account_id={ACCOUNT}"
    written = cli(folder, "provision", "-A", "tasks", "--terraform", "tf", HEDWIG_TRANSPORT_URL=url)
    assert written.returncode == 0, written.stderr
    module = folder / "tf" / "quickstart"
    assert sorted(p.name for p in module.iterdir()) == ["main.tf", "outputs.tf", "variables.tf", "versions.tf"]
    assert 'resource "aws_sqs_queue" "HEDWIG-quickstart-DLQ"' in (module / "main.tf").read_text()
