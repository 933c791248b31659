"""``hedwig-tasks schema check``: the corpus of schema changes in tests/schema_changes, each with
the verdict it must get, and the command as a user runs it (files, git revisions, exit codes)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import cli

from hedwig_tasks.cli import main
from hedwig_tasks.exceptions import SchemaError
from hedwig_tasks.schema_tools import check

CORPUS = Path(__file__).parent / "schema_changes"
CASES: dict[str, dict[str, Any]] = json.loads((CORPUS / "cases.json").read_text())


def test_the_corpus_has_enough_of_each_kind() -> None:
    kinds = {(name.split("-")[0], case["verdict"]) for name, case in CASES.items()}
    assert kinds == {("json", "compatible"), ("json", "violation"), ("proto", "compatible"), ("proto", "violation")}
    assert len(CASES) >= 25
    assert all((CORPUS / case["old"]).exists() and (CORPUS / case["new"]).exists() for case in CASES.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_checker_gives_each_change_its_verdict(name: str) -> None:
    case = CASES[name]
    report = check(str(CORPUS / case["old"]), str(CORPUS / case["new"]), mode=case["mode"])
    assert ("compatible" if report.compatible else "violation") == case["verdict"], report.text()
    for expected in case["finds"]:
        assert any(expected in finding.where for finding in report.violations), (expected, report.text())
    assert all(finding.type and finding.version and finding.where for finding in report.findings)


def test_a_violation_in_the_default_mode_names_its_direction() -> None:
    case = CASES["json-enum-widened"]
    report = check(str(CORPUS / case["old"]), str(CORPUS / case["new"]))
    (violation,) = report.violations
    assert violation.breaks == ("forward",)
    assert check(str(CORPUS / case["old"]), str(CORPUS / case["new"]), mode="backward").compatible


def test_json_and_protobuf_are_not_compared_with_each_other() -> None:
    with pytest.raises(SchemaError, match="compare like with like"):
        check(str(CORPUS / "json-identical/old.json"), str(CORPUS / "proto-identical/old.proto"))


# -- the command ----------------------------------------------------------------------------------


def test_the_command_exits_0_when_compatible_and_1_naming_type_version_and_pointer(tmp_path: Path) -> None:
    ok = cli(CORPUS, "schema", "check", "json-optional-added/old.json", "json-optional-added/new.json")
    assert ok.returncode == 0, ok.stderr
    assert "compatible (mode: both)" in ok.stdout
    assert "ok: order 1.0 -> 1.1 /schemas/order/1.*/properties/coupon: optional property 'coupon' added" in ok.stdout
    bad = cli(CORPUS, "schema", "check", "json-property-retyped/old.json", "json-property-retyped/new.json")
    assert bad.returncode == 1, bad.stderr
    assert "violation: order 1.0 -> 1.1 /schemas/order/1.*/properties/qty/type: type changed" in bad.stdout


def test_the_command_prints_json(tmp_path: Path) -> None:
    done = cli(CORPUS, "schema", "check", "--json", "proto-field-retyped/old.proto", "proto-field-retyped/new.proto")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["compatible"] is False
    assert {v["where"] for v in report["violations"]} == {"OrderV1.qty (2)"}
    assert report["violations"][0]["type"] == "order" and report["violations"][0]["version"] == "1.0 -> 1.1"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["missing.json", "json-identical/new.json"], "cannot read 'missing.json'"),
        (["json-identical/old.json", "json-identical/new.json", "--mode", "sideways"], "invalid choice: 'sideways'"),
        (["json-identical/old.json"], "the following arguments are required: NEW"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], error: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(CORPUS)
    try:
        code = main(["schema", "check", *args])
    except SystemExit as exc:  # argparse's own exit
        code = int(str(exc.code))
    assert code == 2
    assert error in capsys.readouterr().err


def test_a_broken_schema_exits_1(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    done = cli(CORPUS, "schema", "check", "json-identical/old.json", str(tmp_path / "broken.json"))
    assert done.returncode == 1
    assert "is not valid JSON" in done.stderr


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def test_git_revisions_of_json_schema_and_of_proto_files_with_their_imports(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "protos").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "schema.json").write_text((CORPUS / "json-new-required/old.json").read_text())
    address = "syntax = 'proto3';\npackage corpus;\nmessage Address { string city = 1; }\n"
    (repo / "protos" / "address.proto").write_text(address)
    order = (CORPUS / "proto-identical/old.proto").read_text()
    order = order.replace(
        'import "hedwig/protobuf/options.proto";', 'import "hedwig/protobuf/options.proto";\nimport "address.proto";'
    )
    order = order.replace("message Address {\n  string city = 1;\n}\n", "")
    (repo / "protos" / "order.proto").write_text(order)
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    (repo / "schema.json").write_text((CORPUS / "json-new-required/new.json").read_text())
    (repo / "protos" / "address.proto").write_text(address.replace("string city", "int32 city"))
    _git(repo, "commit", "-q", "-am", "second")

    same = cli(repo, "schema", "check", "HEAD~1:schema.json", "HEAD~1:schema.json")
    assert same.returncode == 0, same.stderr
    changed = cli(repo, "schema", "check", "HEAD~1:schema.json", "schema.json")
    assert changed.returncode == 1 and "new required property 'coupon'" in changed.stdout
    proto = cli(repo, "schema", "check", "HEAD~1:protos/order.proto", "HEAD:protos/order.proto")
    assert proto.returncode == 1, proto.stderr
    assert "Address.city (1): type changed from optional string to optional int32" in proto.stdout
    missing = cli(repo, "schema", "check", "HEAD~5:schema.json", "schema.json")
    assert missing.returncode == 2 and "cannot read 'HEAD~5:schema.json' from git" in missing.stderr


def test_generated_pb2_modules_are_compared_without_running_them(tmp_path: Path) -> None:
    pb2 = Path(__file__).parent / "protos" / "cases_pb2.py"
    done = cli(tmp_path, "schema", "check", str(pb2), str(pb2))
    assert done.returncode == 0, done.stderr
    assert "compatible" in done.stdout
