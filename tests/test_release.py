"""Release readiness: the changelog's shape, the metadata, ``--version``, and (slow) a built sdist
and wheel that pass ``twine check`` and whose wheel, in a fresh virtualenv, runs the quick start."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from hedwig_tasks._version import __version__

ROOT = Path(__file__).resolve().parents[1]
#: What a source tree copied for a build leaves out: virtualenvs, caches, build output.
NOT_SOURCE = (".ci", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__", "build", "dist")
NOT_SOURCE_GLOBS = ("*.egg-info", ".hedwig", "site", "node_modules")
KEEP_A_CHANGELOG_SECTIONS = ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")
#: The Pythons .ci/run tests: the whole suite on the newest, the fast tests on the oldest.
TESTED_PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def metadata() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "setup.cfg")
    return parser


def test_changelog_follows_keep_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert "[Keep a Changelog](https://keepachangelog.com/" in text
    versions = re.findall(r"^## (.*)$", text, re.M)
    assert versions[0] == "[Unreleased]", versions
    for heading in versions[1:]:
        assert re.fullmatch(r"\[\d+\.\d+\.\d+\] - \d{4}-\d{2}-\d{2}", heading), heading
    assert f"[{__version__}]" in " ".join(versions), f"the package's version {__version__} has no entry"
    for section in re.findall(r"^### (.*)$", text, re.M):
        assert section.split()[0] in KEEP_A_CHANGELOG_SECTIONS, section


def test_license_and_metadata() -> None:
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    meta = metadata()["metadata"]
    assert meta["license"] == "Apache-2.0"
    urls = dict(line.split(" = ", 1) for line in meta["project_urls"].strip().splitlines())
    assert set(urls) >= {"Documentation", "Source", "Changelog", "Issues"}
    claimed = re.findall(r"Programming Language :: Python :: (3\.\d+)", meta["classifiers"])
    assert tuple(claimed) == TESTED_PYTHONS
    assert metadata()["options"]["python_requires"] == f">={TESTED_PYTHONS[0]}"
    assert "mkdocs" in metadata()["options.extras_require"]["docs"]


def test_version_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hedwig_tasks", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"hedwig-tasks {__version__} (Python ")


def test_readme_points_to_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "](docs/getting-started.md)" in readme
    assert (ROOT / "mkdocs.yml").exists()


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An sdist and a wheel built with ``python -m build`` from a copy of the source tree."""
    base = tmp_path_factory.mktemp("release")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE, *NOT_SOURCE_GLOBS))
    out = base / "dist"
    # --no-isolation: the build backend (setuptools, in the test extra) is already installed
    command = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield out


@pytest.mark.slow
def test_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    files = sorted(p.name for p in dist.iterdir())
    assert files == [f"hedwig_tasks-{__version__}-py3-none-any.whl", f"hedwig_tasks-{__version__}.tar.gz"]
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2


@pytest.mark.slow
def test_wheel_holds_the_package_data(dist: Path) -> None:
    import zipfile

    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {"hedwig_tasks/py.typed", f"hedwig_tasks-{__version__}.dist-info/licenses/LICENSE"}
    wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / "hedwig_tasks").rglob("*.proto")}
    wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / "hedwig_tasks").rglob("static/*") if p.is_file()}
    assert wanted <= names, sorted(wanted - names)
    assert not any(name.startswith(("tests/", "bench/", "examples/")) for name in names)


@pytest.mark.slow
def test_the_wheel_in_a_fresh_virtualenv_runs_the_quick_start(dist: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    (wheel,) = dist.glob("*.whl")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    cli = env_dir / "bin" / "hedwig-tasks"
    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith(f"hedwig-tasks {__version__} "), version.stdout + version.stderr
    folder = tmp_path / "quickstart"
    shutil.copytree(ROOT / "examples" / "quickstart", folder, ignore=shutil.ignore_patterns(".hedwig", "__pycache__"))
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}  # nothing of this checkout's
    script = "hedwig-tasks provision -A tasks && python publish.py 3 && hedwig-tasks worker -A tasks --burst"
    result = subprocess.run(
        ["bash", "-e", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("published user-created 1.0") == 3
    assert result.stderr.count("e-mail to user") == 3
    imported = subprocess.run(
        [str(python), "-c", "import hedwig_tasks; print(hedwig_tasks.__file__)"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    assert imported.stdout.startswith(str(env_dir)), imported.stdout  # the wheel's copy, not this checkout
