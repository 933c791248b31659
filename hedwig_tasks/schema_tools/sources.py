"""Reading a schema to compare: a file, or ``REV:PATH`` in the git repository of the working directory.

:func:`load` returns a :class:`Loaded` schema: a Hedwig JSON-Schema document, or the
``FileDescriptorProto``\\ s of protobuf messages (see :mod:`.protobuf_compat` for the forms).
Every failure is a :class:`~hedwig_tasks.exceptions.SchemaError` saying what was tried.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from hedwig_tasks.exceptions import SchemaError

__all__ = ["DESCRIPTOR_SET_SUFFIXES", "Loaded", "SourceNotFound", "load", "read_bytes"]

#: File name endings read as a protobuf descriptor set.
DESCRIPTOR_SET_SUFFIXES = (".pb", ".desc", ".binpb", ".protoset")

#: Hedwig's option, for a .proto that imports "hedwig/protobuf/options.proto" (authedwig ships
#: only the generated Python, so protoc finds this copy unless an include path has the file).
HEDWIG_OPTIONS_PROTO = """syntax = "proto2";
package hedwig;
import "google/protobuf/descriptor.proto";
message MessageOptions {
  optional uint32 major_version = 1;
  optional uint32 minor_version = 2;
  optional string message_type = 3;
}
extend google.protobuf.MessageOptions {
  optional MessageOptions message_options = 51235;
}
"""

_IMPORT_RE = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;', re.MULTILINE)


class SourceNotFound(SchemaError):
    """The file, revision or path named does not exist (a usage error, not a broken schema)."""


@dataclass(frozen=True)
class Loaded:
    """A schema read from ``name``: ``kind`` is ``"json"`` (``doc``) or ``"protobuf"`` (``files``)."""

    name: str
    kind: str
    doc: dict[str, Any] = field(default_factory=dict)
    files: tuple[Any, ...] = ()


def _git(args: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", *args], capture_output=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SchemaError(f"cannot run git: {exc}") from exc


def _split_revision(spec: str) -> tuple[str, str] | None:
    """``(rev, path)`` when ``spec`` is ``REV:PATH`` and not a file that exists."""
    if Path(spec).exists() or ":" not in spec:
        return None
    rev, _, path = spec.partition(":")
    return (rev, path) if rev and path else None


def read_bytes(spec: str) -> bytes:
    """The bytes of a file, or of ``REV:PATH`` as git holds it."""
    revision = _split_revision(spec)
    if revision is None:
        try:
            return Path(spec).read_bytes()
        except OSError as exc:
            raise SourceNotFound(f"cannot read {spec!r}: {exc.strerror} (give a file, or REV:PATH in git)") from exc
    rev, path = revision
    shown = _git(["show", f"{rev}:{path}"])
    if shown.returncode != 0:
        why = shown.stderr.decode(errors="replace").strip().splitlines()
        raise SourceNotFound(f"cannot read {spec!r} from git: {why[-1] if why else 'git show failed'}")
    return shown.stdout


def _load_json(spec: str, raw: bytes) -> Loaded:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise SchemaError(f"{spec} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("schemas"), dict):
        raise SchemaError(f"{spec} is not a Hedwig schema file: it has no 'schemas' object")
    return Loaded(spec, "json", doc=doc)


def _descriptor_set(spec: str, raw: bytes) -> tuple[Any, ...]:
    from google.protobuf import descriptor_pb2
    from google.protobuf.message import DecodeError

    try:
        return tuple(descriptor_pb2.FileDescriptorSet.FromString(raw).file)
    except DecodeError as exc:
        raise SchemaError(f"{spec} is not a protobuf descriptor set: {exc}") from None


def _pb2_descriptor(spec: str, raw: bytes) -> tuple[Any, ...]:
    """The file descriptor a generated ``_pb2.py`` registers, read from its source without running it."""
    from google.protobuf import descriptor_pb2

    for node in ast.walk(ast.parse(raw, filename=spec)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return (descriptor_pb2.FileDescriptorProto.FromString(node.args[0].value),)
    raise SchemaError(f"{spec} is not protoc's Python output: no AddSerializedFile(b'...') in it")


def _protoc() -> Callable[[list[str]], tuple[int, str]]:
    """A way to run protoc: grpcio-tools's in a child Python, else ``protoc`` on ``PATH``."""
    try:
        import grpc_tools
    except ImportError:
        binary = shutil.which("protoc")
        if binary is None:
            raise SchemaError(
                "comparing .proto files needs protoc: pip install grpcio-tools (or put protoc on PATH), "
                "or compare descriptor sets (protoc --include_imports --descriptor_set_out=FILE) or _pb2.py files"
            ) from None
        return lambda args: _run([binary, *args])
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    return lambda args: _run([sys.executable, "-m", "grpc_tools.protoc", f"-I{well_known}", *args])


def _run(argv: list[str]) -> tuple[int, str]:
    done = subprocess.run(argv, capture_output=True, check=False, timeout=120)
    return done.returncode, done.stderr.decode(errors="replace").strip()


@contextlib.contextmanager
def _proto_tree(spec: str, raw: bytes, include: Sequence[str]) -> Iterator[tuple[Path, str, list[str]]]:
    """``(temporary dir, file to compile, include paths)``: from git, the file and what it imports
    at that revision are written into the temporary directory."""
    with tempfile.TemporaryDirectory(prefix="hedwig-proto-") as tmp:
        root = Path(tmp)
        options = root / "fallback" / "hedwig" / "protobuf" / "options.proto"
        options.parent.mkdir(parents=True)
        options.write_text(HEDWIG_OPTIONS_PROTO)
        package_root = str(Path(__file__).resolve().parents[2])  # for hedwig_tasks/validators/*.proto
        revision = _split_revision(spec)
        if revision is None:
            path = Path(spec).resolve()
            paths = [str(path.parent), *include, os.getcwd(), package_root, str(options.parents[2])]
            yield root, str(path), paths
            return
        rev, rel = revision
        _copy_revision(rev, PurePosixPath(rel), raw, root / "tree")
        here = root / "tree" / PurePosixPath(rel).parent
        paths = [str(here), str(root / "tree"), *include, package_root, str(options.parents[2])]
        yield root, str(root / "tree" / rel), paths


def _copy_revision(rev: str, rel: PurePosixPath, raw: bytes, tree: Path) -> None:
    """Write ``rel`` and, recursively, the imports git holds at ``rev`` (beside it or from the top)."""
    pending, done = [(rel, raw)], set()
    while pending:
        path, content = pending.pop()
        if path in done:
            continue
        done.add(path)
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(content)
        for name in _IMPORT_RE.findall(content.decode(errors="replace")):
            for candidate in (rel.parent / name, PurePosixPath(name)):
                shown = _git(["show", f"{rev}:{candidate}"])
                if shown.returncode == 0:
                    pending.append((candidate, shown.stdout))
                    break


def _compile_proto(spec: str, raw: bytes, include: Sequence[str]) -> tuple[Any, ...]:
    run = _protoc()
    with _proto_tree(spec, raw, include) as (tmp, target, paths):
        out = tmp / "set.pb"
        code, errors = run([*(f"-I{p}" for p in paths), "--include_imports", f"--descriptor_set_out={out}", target])
        if code != 0:
            raise SchemaError(f"protoc could not compile {spec}: {errors.splitlines()[-1] if errors else code}")
        return _descriptor_set(spec, out.read_bytes())


def load(spec: str, *, include: Sequence[str] = ()) -> Loaded:
    """The schema ``spec`` names (a file or ``REV:PATH``); ``include`` adds protoc include paths."""
    raw = read_bytes(spec)
    name = spec.rpartition(":")[2] if _split_revision(spec) else spec
    if name.endswith(".proto"):
        return Loaded(spec, "protobuf", files=_compile_proto(spec, raw, include))
    if name.endswith(DESCRIPTOR_SET_SUFFIXES):
        return Loaded(spec, "protobuf", files=_descriptor_set(spec, raw))
    if name.endswith("_pb2.py"):
        return Loaded(spec, "protobuf", files=_pb2_descriptor(spec, raw))
    return _load_json(spec, raw)
