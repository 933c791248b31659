"""``hedwig-tasks schema docs``: the AsyncAPI 3.0 document validates against the AsyncAPI 3.0.0
JSON Schema (vendored in tests/asyncapi) and says who publishes and consumes what; the HTML
catalogue has a page per type, its majors side by side with what changed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cli_helpers import cli, project

from hedwig_tasks import Hedwig
from hedwig_tasks.cli import main
from hedwig_tasks.schema_tools.asyncapi import document
from hedwig_tasks.schema_tools.contract import from_app

TESTS = Path(__file__).parent
ASYNCAPI = jsonschema.Draft7Validator(json.loads((TESTS / "asyncapi" / "asyncapi-3.0.0.json").read_text()))
SCHEMA = TESTS / "schemas" / "schema.json"


def _errors(doc: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in ASYNCAPI.iter_errors(doc)]


def test_the_quickstart_app_is_documented_and_its_asyncapi_document_is_valid(tmp_path: Path) -> None:
    folder = project(tmp_path)
    done = cli(folder, "schema", "docs", "-A", "tasks", "--out", "docs")
    assert done.returncode == 0, done.stderr
    doc = json.loads((folder / "docs" / "asyncapi.json").read_text())
    assert _errors(doc) == []
    assert doc["channels"]["send_email-v1"]["address"] == "send_email-v1"
    message = doc["components"]["messages"]["send_email.v1"]
    assert message["x-hedwig-version"] == "1.1"
    assert message["payload"]["schema"]["required"] == ["to", "subject"]
    assert {name: op["action"] for name, op in doc["operations"].items()} == {
        "quickstart.send.send_email.v1": "send",
        "quickstart.receive.send_email.v1": "receive",
        "quickstart.send.user-created.v1": "send",
        "quickstart.receive.user-created.v1": "receive",
    }
    assert sorted(p.name for p in (folder / "docs").iterdir()) == [
        "asyncapi.json",
        "index.html",
        "send_email.html",
        "user-created.html",
    ]


def test_the_validation_catches_a_document_that_breaks_asyncapi(tmp_path: Path) -> None:
    app = Hedwig("svc", schema=SCHEMA, transport="memory://")
    doc = document(from_app(app))
    assert _errors(doc) == []
    doc["operations"]["svc.send.send_email.v1"]["action"] = "publish"  # AsyncAPI 2's word, not 3's
    del doc["info"]["version"]
    assert len(_errors(doc)) == 2


def test_several_services_from_schema_files(tmp_path: Path) -> None:
    done = cli(
        TESTS,
        "schema",
        "docs",
        "--publisher",
        f"accounts={SCHEMA}",
        "--consumer",
        "mailer=send_email:1",
        "--consumer",
        "crm=user-created:2",
        "--out",
        str(tmp_path / "docs"),
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "docs" / "asyncapi.json").read_text())
    assert _errors(doc) == []
    assert "Services: accounts, crm, mailer." in doc["info"]["description"]
    assert doc["operations"]["crm.receive.user-created.v2"]["channel"] == {"$ref": "#/channels/user-created-v2"}
    assert doc["operations"]["mailer.receive.send_email.v1"]["x-hedwig-service"] == "mailer"
    profile = doc["components"]["messages"]["user-created.v1"]["payload"]["schema"]["properties"]["profile"]
    assert profile == {"$ref": "#/components/schemas/profile"}
    assert doc["components"]["schemas"]["profile"]["schema"]["required"] == ["name"]


def test_the_catalogue_shows_majors_side_by_side_with_what_changed(tmp_path: Path) -> None:
    older = TESTS / "schema_changes" / "json-identical" / "old.json"
    done = cli(
        TESTS, "schema", "docs", "--publisher", f"accounts={SCHEMA}", "--out", str(tmp_path), "--since", str(older)
    )
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "user-created.html").read_text()
    assert page.count("<th>") == 2 and "<th>1.2</th><th>2.0</th>" in page
    assert "<b>changed from 1.2</b>" in page
    assert "new required property &#x27;email&#x27; (breaks backward)" in page
    assert "<b>new</b> since the older schema" in page
    index = (tmp_path / "index.html").read_text()
    assert '<a href="send_email.html">send_email</a>' in index and "accounts" in index


def test_a_protobuf_app_is_documented_too() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # authedwig's modules import distutils
        from protos import cases_pb2
    app = Hedwig("profiles", schema=[cases_pb2.ProfileV1, cases_pb2.InferredV2], transport="memory://")
    doc = document(from_app(app))
    assert _errors(doc) == []
    payload = doc["components"]["messages"]["profile.v1"]["payload"]
    assert payload["schemaFormat"] == "application/vnd.google.protobuf;version=3"
    assert "hedwig_tasks_tests.cases.Address address = 2;" in payload["schema"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "give -A MODULE (the app), or --publisher SERVICE=SCHEMA"),
        (["--publisher", "accounts"], "--publisher accounts: expected SERVICE=VALUE"),
        (["--publisher", f"a={SCHEMA}", "--consumer", "b=send_email"], "expected SERVICE=TYPE:MAJOR"),
        (["--publisher", "a=missing.json"], "cannot read 'missing.json'"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, args: list[str], error: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["schema", "docs", *args, "--out", str(tmp_path / "docs")]) == 2
    assert error in capsys.readouterr().err
