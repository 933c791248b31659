"""The CLI's errors, version and banner, through the real command in a subprocess: every error
is one line naming the option at fault and the fix, with the exit codes ``worker --help`` lists."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cli_helpers import cli, one_error, project

from hedwig_tasks._version import __version__


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return project(tmp_path)


def test_help_documents_the_exit_codes(folder: Path) -> None:
    result = cli(folder, "worker", "--help")
    assert result.returncode == 0
    assert "1  the app, a setting or the schema is wrong" in result.stdout
    assert "3  something needed at start-up is unavailable" in result.stdout
    assert "--metrics-port or --health-port already in use" in result.stdout


def test_version(folder: Path) -> None:
    result = cli(folder, "--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"hedwig-tasks {__version__} (Python 3.")


def test_forgetting_the_app_names_the_options(folder: Path) -> None:
    result = cli(folder, "worker")
    assert result.returncode == 1
    error = one_error(result)
    assert "-A MODULE[:ATTRIBUTE] names the module holding your Hedwig app (as in -A tasks)" in error
    assert "--settings MODULE" in error


def test_a_missing_settings_module(folder: Path) -> None:
    result = cli(folder, "worker", "--settings", "nonexistent_settings")
    assert result.returncode == 1
    error = one_error(result)
    assert error.startswith("error: --settings nonexistent_settings: no module named 'nonexistent_settings' in ")
    assert "give the dotted module path of your settings" in error


def test_a_file_for_a_module(folder: Path) -> None:
    error = one_error(cli(folder, "worker", "-A", "tasks.py"))
    assert error == "error: -A tasks.py: -A takes a module, not a file: use -A tasks"
    error = one_error(cli(folder, "status", "-A", "sub/tasks.py:hedwig"))
    assert error.endswith("use -A sub.tasks:hedwig")


def test_a_misspelt_module_gets_a_suggestion(folder: Path) -> None:
    result = cli(folder, "worker", "-A", "taks")
    assert result.returncode == 1
    error = one_error(result)
    assert f"no module named 'taks' in {folder}" in error and "(did you mean -A tasks?)" in error


def test_a_module_of_the_standard_library_is_named_as_such(folder: Path) -> None:
    (folder / "tasks.py").rename(folder / "emails.py")
    result = cli(folder, "worker", "-A", "email")
    assert result.returncode == 1
    error = one_error(result)
    assert "that imported email from the standard library (" in error
    assert "which holds no Hedwig app; did you mean -A emails?" in error


def test_an_error_inside_the_module_shows_its_traceback_then_one_line(folder: Path) -> None:
    (folder / "broken.py").write_text("import tasks\nmailer.send()\n")
    result = cli(folder, "worker", "-A", "broken")
    assert result.returncode == 1
    assert "Traceback" in result.stderr  # the user's own error: its traceback is theirs to read
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: -A broken: importing broken raised NameError: name 'mailer' is not defined (traceback above)"


def test_a_busy_metrics_port_exits_3_naming_the_option(folder: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(
            folder, "worker", "-A", "tasks", "--burst", "--metrics-port", str(port), "--probe-host", "127.0.0.1"
        )
    assert result.returncode == 3
    error = one_error(result)
    assert error.startswith(f"error: --metrics-port {port}: port {port} on 127.0.0.1 is already in use")
    assert "choose a free port" in error


def test_banner_names_what_runs_with_the_password_masked(folder: Path) -> None:
    url = "amqp://guest:s3cr3t-pw@127.0.0.1:1//"  # nothing listens on port 1: the worker fails after the banner
    result = cli(folder, "worker", "-A", "tasks", "--transport", url, "-c", "3", "--prefetch", "7", timeout_s=180)
    assert result.returncode == 3, result.stderr
    assert "s3cr3t-pw" not in result.stderr + result.stdout
    banner = result.stderr.split("\n", 6)[:6]
    assert banner[0].startswith(f"hedwig-tasks {__version__} worker")
    assert banner[1:] == [
        "  app:         quickstart (tasks)",
        "  transport:   amqp://guest:***@127.0.0.1:1//",
        "  queue:       quickstart",
        "  topics:      user-created-v1, send_email-v1",
        "  concurrency: 3 threads, prefetch 7",
    ]


def test_a_worker_for_an_app_without_handlers_says_so(folder: Path) -> None:
    (folder / "publisher.py").write_text(
        "from pathlib import Path\nfrom hedwig_tasks import Hedwig\n"
        "hedwig = Hedwig('orders', schema=Path(__file__).with_name('schema.json'))\n"
    )
    result = cli(folder, "worker", "-A", "publisher")
    assert result.returncode == 1
    assert "'orders' has no handlers, so there is nothing to consume" in one_error(result)
    planned = cli(folder, "provision", "-A", "publisher", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.splitlines() == ["would create topic user-created-v1", "would create topic send_email-v1"]


def test_a_negative_heartbeat_names_the_option(folder: Path) -> None:
    result = cli(folder, "worker", "-A", "tasks", "--heartbeat", "-1", "--burst")
    assert result.returncode == 1
    assert one_error(result) == "error: --heartbeat must be 0 (no row) or more seconds, got -1"
