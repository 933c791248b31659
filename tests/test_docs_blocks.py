"""Every ```python block in README.md and docs/*.md runs as written, and so does the quick start.

Each block runs in a subprocess, in a fresh directory holding a copy of examples/quickstart
(``tasks.py``, ``publish.py``, ``schema.json``), with no transport in the environment (so the
default SQLite bus, in that directory). A block that defines ``test_*`` functions is run by
pytest, with the package's plugin; any other is run with ``python`` as ``__main__``.
A block that cannot run here says why on a line of its own, ``# not-run: <reason>`` (a server it
needs, a deliberately partial fragment); keep those rare.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"^\s*# not-run:(.*)$", re.M)


def blocks(language: str) -> list[tuple[str, str]]:
    """``(page:line, code)`` for every block fenced as ``language``."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match[1] == language:
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", match[2]))
    return found


def _environment() -> dict[str, str]:
    unset = ("HEDWIG_TRANSPORT_URL", "SETTINGS_MODULE", "DJANGO_SETTINGS_MODULE", "PYTHONPATH")
    return {key: value for key, value in os.environ.items() if key not in unset}


def _workdir(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    shutil.copytree(QUICKSTART, folder, ignore=shutil.ignore_patterns(".hedwig", "__pycache__"))
    return folder


PYTHON_BLOCKS = blocks("python")


def test_the_pages_have_python_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 2  # the extraction found them: a regex that matched nothing would pass


def test_not_run_markers_give_a_reason() -> None:
    for where, code in PYTHON_BLOCKS:
        for reason in NOT_RUN.findall(code):
            assert len(reason.strip()) >= 10, f"{where}: say why the block cannot run here"


@pytest.mark.parametrize(("where", "code"), PYTHON_BLOCKS, ids=[where for where, _ in PYTHON_BLOCKS])
def test_python_block_runs(where: str, code: str, tmp_path: Path) -> None:
    reason = NOT_RUN.search(code)
    if reason:
        pytest.skip(f"{where}: {reason[1].strip()}")
    folder = _workdir(tmp_path)
    if re.search(r"^(async )?def test_", code, re.M):
        (folder / "test_block.py").write_text(code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_block.py"]
    else:
        (folder / "block.py").write_text(code)
        command = [sys.executable, "block.py"]
    result = subprocess.run(command, cwd=folder, env=_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{where} failed:\n{result.stdout}\n{result.stderr}"


def test_first_handler_then_its_worker(tmp_path: Path) -> None:
    """README's first handler, saved as myapp.py, then the shell line under it: it publishes only
    when run, and the worker handles both messages."""
    ((_, code),) = [(w, c) for w, c in PYTHON_BLOCKS if "def send_email" in c and "README" in w]
    ((_, shell),) = [(w, c) for w, c in blocks("bash") if "-A myapp" in c]
    folder = _workdir(tmp_path)
    (folder / "myapp.py").write_text(code)
    imported = subprocess.run(
        [sys.executable, "-c", "import myapp"], cwd=folder, env=_environment(), capture_output=True, text=True
    )
    assert imported.returncode == 0 and not (folder / ".hedwig").exists(), "importing myapp touched the bus"
    result = subprocess.run(
        ["bash", "-e", "-c", shell], cwd=folder, env=_environment(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "e-mail to someone@example.com: Hello!" in result.stderr
    assert "e-mail to a@example.com: Hi" in result.stderr


def test_quick_start_runs_from_the_repository_root(tmp_path: Path) -> None:
    """The quick start's first command, typed at the root (less ``pip install``, done already), then
    ``status`` as the text says: each from the root, and the shell stays there."""
    ((_, shell),) = [(w, c) for w, c in blocks("bash") if "publish.py 5" in c]
    [first] = [line for line in shell.splitlines() if "hedwig-tasks provision" in line]
    assert first.startswith("pip install -e . && ")
    root = tmp_path / "clone"
    shutil.copytree(QUICKSTART, root / "examples" / "quickstart", ignore=shutil.ignore_patterns(".hedwig"))
    readme = (ROOT / "README.md").read_text()
    [status] = re.findall(r"`(\(cd examples/quickstart && hedwig-tasks status -A tasks\))`", readme)
    script = f"{first.removeprefix('pip install -e . && ')}\n{status}\npwd\n"
    result = subprocess.run(
        ["bash", "-e", "-c", script], cwd=root, env=_environment(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("published user-created 1.0") == 5
    assert result.stderr.count("e-mail to user") == 5
    assert result.stdout.strip().splitlines()[-1] == str(root)  # the shell is where it started
    assert shlex.split(first)[0] == "pip"
