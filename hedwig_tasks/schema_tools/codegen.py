"""``hedwig-tasks schema codegen``: Python types from a Hedwig JSON-Schema file.

One ``TypedDict`` per message type and major (``send_email`` 1.x is ``SendEmailV1``), or a
frozen dataclass each with ``dataclasses=True``; nested objects and ``$ref``'d definitions get
classes of their own. Beside them, a typed publish function per type and major
(``publish_send_email_v1(app, data, ...)``, which calls the app's own ``publish`` with the
newest minor the schema had) and, for ``TypedDict`` s, a typed reader of a received message's
data (``send_email_v1_data(message)``). So mypy checks a publish's fields and their types.

The schema file stays the authority: the output is a pure function of the schema and the
command (sorted, no dates), with a header naming both, so a test can regenerate it and fail
when a checked-in copy is stale.
"""

from __future__ import annotations

import argparse
import json
import keyword
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hedwig_tasks.exceptions import SchemaError

__all__ = ["add_codegen_command", "generate", "generate_file"]

_SCALARS = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None"}
_MAJOR_RE = re.compile(r"^(\d+)\.\*$")
#: What the generated module may take from ``typing``, in the order it imports them.
_TYPING = ("Any", "ClassVar", "Literal", "TypedDict", "cast")


@dataclass(frozen=True)
class _Field:
    key: str
    type: str
    required: bool
    description: str = ""

    @property
    def attribute(self) -> str:
        """The key as a Python name (dataclasses; TypedDicts keep the key)."""
        name = re.sub(r"\W", "_", self.key)
        name = f"_{name}" if name[:1].isdigit() else name
        return f"{name}_" if keyword.iskeyword(name) else name


@dataclass(frozen=True)
class _Class:
    name: str
    fields: tuple[_Field, ...]
    description: str = ""


@dataclass
class _Generator:
    """Walks the schema, naming a class per object; ``classes`` in the order they can be written."""

    document: Mapping[str, Any]
    classes: dict[str, _Class] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def type_of(self, node: Any, hint: str) -> str:
        if not isinstance(node, Mapping):
            return "Any"
        if "$ref" in node:
            return self.ref(str(node["$ref"]))
        if "enum" in node or "const" in node:
            return self.literal(node["enum"] if "enum" in node else [node["const"]])
        for key in ("anyOf", "oneOf"):
            if key in node:
                return _union(self.type_of(option, f"{hint}Option{i}") for i, option in enumerate(node[key], 1))
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) == 1:
            return self.type_of(node["allOf"][0], hint)
        kind = node.get("type", "object" if "properties" in node else None)
        if isinstance(kind, list):
            return _union(self.type_of({**node, "type": one}, hint) for one in kind)
        if kind == "object":
            return self.object(node, hint)
        if kind == "array":
            items = node.get("items")
            return f"list[{self.type_of(items, f'{hint}Item') if isinstance(items, Mapping) else 'Any'}]"
        return _SCALARS.get(str(kind)) or "Any"

    def literal(self, values: list[Any]) -> str:
        if not values or not all(isinstance(v, (str, int, bool)) or v is None for v in values):
            return "Any"
        return f"{'Literal'}[{', '.join(json.dumps(v) if isinstance(v, str) else repr(v) for v in values)}]"

    def ref(self, ref: str) -> str:
        if ref in self.refs:
            return self.refs[ref]
        if not ref.startswith("#/"):
            return "Any"  # another document: not followed
        target: Any = self.document
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, Mapping) else None
        if not isinstance(target, Mapping):
            raise SchemaError(f"$ref {ref!r} points at nothing in the schema")
        name = self.refs[ref] = _pascal(ref.rsplit("/", 1)[-1])
        resolved = self.type_of(target, name)
        self.refs[ref] = resolved
        return resolved

    def object(self, node: Mapping[str, Any], name: str) -> str:
        properties = node.get("properties")
        if not isinstance(properties, Mapping) or not properties:
            extra = node.get("additionalProperties")
            value = self.type_of(extra, f"{name}Value") if isinstance(extra, Mapping) else "Any"
            return f"dict[str, {value}]"
        required = set(node.get("required") or ())
        fields = tuple(
            _Field(
                str(key),
                self.type_of(schema, name + _pascal(str(key))),
                key in required,
                str(schema.get("description", "")) if isinstance(schema, Mapping) else "",
            )
            for key, schema in properties.items()
        )
        made = _Class(name, fields, str(node.get("description", "")))
        if self.classes.get(name, made) != made:
            return self.object(node, _next_name(name, self.classes))
        self.classes[name] = made
        return name


def _next_name(name: str, taken: Mapping[str, Any]) -> str:
    number = 2
    while f"{name}{number}" in taken:
        number += 1
    return f"{name}{number}"


def _union(types: Any) -> str:
    return " | ".join(dict.fromkeys(types))


def _pascal(text: str) -> str:
    name = "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", text) if part)
    return name if name[:1].isalpha() else f"T{name}"


def _snake(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_").lower()


# -- rendering --------------------------------------------------------------------------------


def _docstring(text: str, indent: str, *, then: bool = False) -> list[str]:
    """The docstring line (none for no text), and a blank line after it when ``then`` (code follows)."""
    text = " ".join(text.split()).replace('"""', "'''").replace("\\", "\\\\")
    return [f'{indent}"""{text}"""', *([""] if then else [])] if text else []


def _typeddict(made: _Class) -> list[str]:
    identifiers = all(f.key.isidentifier() and not keyword.iskeyword(f.key) for f in made.fields)
    required = [f for f in made.fields if f.required]
    optional = [f for f in made.fields if not f.required]
    if not identifiers:
        return _typeddict_functional(made, required, optional)
    lines: list[str] = []
    base = "TypedDict"
    if required and optional:
        base = f"_{made.name}Required"
        lines += [f"class {base}(TypedDict):", *_docstring(f"The required fields of {made.name}.", "    ", then=True)]
        lines += [f"    {f.key}: {f.type}" for f in required] + ["", ""]
    total = ", total=False" if optional else ""
    lines += [f"class {made.name}({base}{total}):", *_docstring(made.description, "    ", then=True)]
    own = optional if required and optional else made.fields
    lines += [f"    {f.key}: {f.type}" for f in own]
    return lines


def _typeddict_functional(made: _Class, required: list[_Field], optional: list[_Field]) -> list[str]:
    """For keys that are not Python names (``user-id``): a required and an optional part (in
    TypedDict's call syntax where a key needs it), and the class both make."""
    parts = [(f"_{made.name}Required", required, True), (f"_{made.name}Optional", optional, False)]
    parts = [part for part in parts if part[1]]
    lines: list[str] = []
    for name, fields, total in parts:
        if all(f.key.isidentifier() and not keyword.iskeyword(f.key) for f in fields):
            lines += [f"class {name}(TypedDict{'' if total else ', total=False'}):"]
            lines += [f"    {f.key}: {f.type}" for f in fields]
        else:
            entries = [f"        {json.dumps(f.key)}: {f.type}," for f in fields]
            lines += [f"{name} = TypedDict(", f"    {json.dumps(name)},", "    {", *entries, "    },"]
            lines += [f"    total={total},", ")"]
        lines += ["", ""]
    docstring = _docstring(made.description, "    ") or ["    pass"]
    return [*lines, f"class {made.name}({', '.join(name for name, _, _ in parts)}):", *docstring]


def _dataclass(made: _Class) -> list[str]:
    ordered = sorted(made.fields, key=lambda f: not f.required)  # fields with defaults last
    lines = ["@dataclass(frozen=True)", f"class {made.name}:", *_docstring(made.description, "    ", then=True)]
    for item in ordered:
        lines.append(f"    {item.attribute}: {item.type}" + ("" if item.required else " | None = None"))
    renamed = {f.attribute: f.key for f in made.fields if f.attribute != f.key}
    if renamed:
        lines.append(f"    _keys: ClassVar[dict[str, str]] = {json.dumps(renamed)}")
    return lines


_AS_DATA = '''def as_data(value: Any) -> Any:
    """A dataclass of this module (nested ones too) as the dict its schema describes; an optional
    field left at None is left out."""
    if is_dataclass(value) and not isinstance(value, type):
        keys = getattr(value, "_keys", {})
        data: dict[str, Any] = {}
        for item in fields(value):
            got = getattr(value, item.name)
            if not (got is None and item.default is None):
                data[keys.get(item.name, item.name)] = as_data(got)
        return data
    if isinstance(value, list):
        return [as_data(item) for item in value]
    return value'''


def _functions(message_type: str, major: int, version: str, name: str, dataclasses: bool) -> list[str]:
    function = f"{_snake(message_type)}_v{major}"
    data = "as_data(data)" if dataclasses else "data"
    lines = [
        "",
        "",
        f"def publish_{function}(",
        "    app: Hedwig,",
        f"    data: {name},",
        "    headers: Mapping[str, str] | None = None,",
        "    **options: Any,",
        ") -> Message:",
        *_docstring(f"Publish a ``{message_type}`` {version} message (the newest {major}.x of the schema).", "    "),
        f"    return app.publish({json.dumps(message_type)}, {json.dumps(version)}, {data}, headers, **options)",
    ]
    if not dataclasses:
        lines += [
            "",
            "",
            f"def {function}_data(message: Message) -> {name}:",
            *_docstring(
                f"A received ``{message_type}`` {major}.x message's data, typed (validated on receipt).", "    "
            ),
            f"    return cast({name}, message.data)",
        ]
    return lines


def generate(
    schema: Mapping[str, Any], *, source: str, command: str = "hedwig-tasks schema codegen", dataclasses: bool = False
) -> str:
    """The module's text for the Hedwig JSON-Schema document ``schema``.

    ``source`` (what the schema was read from) and ``command`` are written in the header.
    Raises ``SchemaError`` when ``schema`` has no ``schemas`` or a major is not ``"<n>.*"``.
    """
    generator = _Generator(schema)
    publishes: list[str] = []
    for message_type, majors in sorted(_types(schema).items()):
        for major, node in sorted(majors.items()):
            name = _pascal(message_type) + f"V{major}"
            typed = generator.type_of({**node, "type": "object"}, name)
            version = str(node.get("x-version") or f"{major}.0")
            publishes += _functions(message_type, major, version, typed, dataclasses)
    body: list[str] = []
    for made in generator.classes.values():
        body += ["", "", *(_dataclass(made) if dataclasses else _typeddict(made))]
    if dataclasses:
        body += ["", "", _AS_DATA]
    text = "\n".join([*body, *publishes, ""])
    return "\n".join(_header(schema, source, command, text, dataclasses)) + "\n" + text


def _types(schema: Mapping[str, Any]) -> dict[str, dict[int, Mapping[str, Any]]]:
    schemas = schema.get("schemas")
    if not isinstance(schemas, Mapping):
        raise SchemaError("codegen: not a Hedwig JSON-Schema file (no 'schemas' object)")
    found: dict[str, dict[int, Mapping[str, Any]]] = {}
    for message_type, majors in schemas.items():
        for pattern, node in (majors or {}).items():
            match = _MAJOR_RE.match(str(pattern))
            if not match or not isinstance(node, Mapping):
                raise SchemaError(f"codegen: {message_type} {pattern!r}: expected a major such as '1.*'")
            found.setdefault(str(message_type), {})[int(match.group(1))] = node
    return found


def _header(schema: Mapping[str, Any], source: str, command: str, text: str, dataclasses: bool) -> list[str]:
    kind = "frozen dataclass" if dataclasses else "TypedDict"
    typing_names = [name for name in _TYPING if re.search(rf"\b{name}\b", text)]
    lines = [
        f"# Generated by `{command}`",
        f"# from {source} (schema {schema.get('id', '?')}).",
        "# Do not edit: change the schema and generate again; a test fails when this file is stale.",
        f'"""Typed payloads of the schema: a {kind} per message type and major, and typed publish functions."""',
        "",
        "from __future__ import annotations",
        "",
        "from collections.abc import Mapping",
    ]
    if dataclasses:
        lines.append("from dataclasses import dataclass, fields, is_dataclass")
    lines += [f"from typing import {', '.join(typing_names)}", "", "from hedwig_tasks import Hedwig, Message"]
    return lines


def generate_file(path: str | Path, *, command: str, dataclasses: bool = False) -> str:
    """:func:`generate` for the schema file at ``path`` (named in the header as given)."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SchemaError(f"codegen: cannot read {path}: {exc}") from None
    return generate(schema, source=Path(path).as_posix(), command=command, dataclasses=dataclasses)


# -- the command ------------------------------------------------------------------------------


def add_codegen_command(actions: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """``schema codegen [SCHEMA | -A MODULE] [--out FILE] [--dataclasses]``."""
    codegen = actions.add_parser("codegen", help="write TypedDicts (or dataclasses) and typed publish functions")
    codegen.add_argument("schema", nargs="?", metavar="SCHEMA", help="a Hedwig JSON-Schema file (else -A's schema)")
    common(codegen)
    codegen.add_argument("--out", metavar="FILE", help="write the module here (default: print it)")
    codegen.add_argument("--dataclasses", action="store_true", help="frozen dataclasses instead of TypedDicts")
    codegen.set_defaults(needs_app=False, func=cmd_codegen)


def cmd_codegen(args: argparse.Namespace, app: None) -> int:
    """Write (or print) the module; 0, or a ``SchemaError`` the CLI reports."""
    words = ["hedwig-tasks schema codegen", args.schema or (f"-A {args.app}" if args.app else "")]
    words += ["--dataclasses" if args.dataclasses else "", f"--out {args.out}" if args.out else ""]
    command = " ".join(word for word in words if word)
    if args.schema:
        text = generate_file(args.schema, command=command, dataclasses=args.dataclasses)
    else:
        text = _from_app(args, command)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def _from_app(args: argparse.Namespace, command: str) -> str:
    from hedwig_tasks._cli_app import find_app

    app = find_app(args.app, args.settings)
    try:
        schema = getattr(app.validator, "schema", None)
        if not isinstance(schema, Mapping):
            raise SchemaError(f"codegen: app {app.name!r} has no JSON Schema (protobuf has its own generated classes)")
        return generate(schema, source=f"the schema of app {app.name!r}", command=command, dataclasses=args.dataclasses)
    finally:
        app.close()
