"""Running ``hedwig-tasks`` as a user does: a subprocess, in a folder of the test's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
UNSET = ("HEDWIG_TRANSPORT_URL", "SETTINGS_MODULE", "DJANGO_SETTINGS_MODULE", "PYTHONPATH")


def project(tmp_path: Path) -> Path:
    """A copy of examples/quickstart (tasks.py, publish.py, schema.json) to run commands in."""
    folder = tmp_path / "project"
    shutil.copytree(QUICKSTART, folder, ignore=shutil.ignore_patterns(".hedwig", "__pycache__"))
    return folder


def cli(
    folder: Path, *args: str, stdin: str = "", timeout_s: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """``hedwig-tasks ARGS`` in ``folder``, with no transport or settings from this environment."""
    environment = {key: value for key, value in os.environ.items() if key not in UNSET}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "hedwig_tasks", *args],
        cwd=folder,
        env=environment,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line a failed command printed; fails unless it is the only error and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]
