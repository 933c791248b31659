"""A static HTML catalogue of a :class:`~hedwig_tasks.schema_tools.contract.Contract`.

``index.html`` lists every type with its majors, topics, publishers and consumers; one page per
type (``<type>.html``) shows its majors side by side: the newest version, topic, services,
the schema, and what changed, found by the compatibility checker: from the previous major, and,
when an older contract is given (``schema docs --since REV:PATH``), since that one.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from hedwig_tasks.schema_tools.compat import compare_schemas, pointer
from hedwig_tasks.schema_tools.contract import Contract, MessageSpec
from hedwig_tasks.schema_tools.findings import Finding

__all__ = ["changes", "page_name", "write_catalogue"]

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.4em .6em;vertical-align:top;text-align:left}
pre{background:#f6f8fa;padding:.6em;overflow:auto;max-width:40em;font-size:.85em}
.bad{color:#a40000}.ok{color:#2a6a00}ul{padding-left:1.2em;margin:.2em 0}"""
_UNSAFE_FILE = re.compile(r"[^\w.\-]")


def page_name(message_type: str) -> str:
    """The file name of a type's page."""
    return _UNSAFE_FILE.sub("_", message_type) + ".html"


def changes(old: MessageSpec, new: MessageSpec) -> list[Finding]:
    """What changed from one schema of a type to another (JSON Schema only; protobuf: none)."""
    if old.schema is None or new.schema is None:
        return []
    where = pointer("schemas", new.type, f"{new.version.major}.*")
    label = f"{old.version} -> {new.version}"
    found = compare_schemas(
        old.schema, new.schema, old_doc=old.root, new_doc=new.root, type_=new.type, version=label, where=where
    )
    return [Finding(f.type, f.version, f.where[len(where) :] or "/", f.message, f.breaks) for f in found]


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _names(names: tuple[str, ...]) -> str:
    return html.escape(", ".join(names)) or "&mdash;"


def _services(contract: Contract, spec: MessageSpec) -> tuple[str, str]:
    """Who publishes and who consumes a (type, major), as HTML."""
    return _names(contract.publishers.get(spec.key, ())), _names(contract.consumers.get(spec.key, ()))


def _findings(heading: str, found: list[Finding]) -> str:
    if not found:
        return f"<p><b>{html.escape(heading)}</b>: no change</p>"
    items = "".join(
        f'<li class="{"bad" if f.breaks else "ok"}"><code>{html.escape(f.where)}</code> {html.escape(f.message)}'
        f"{' (breaks ' + html.escape(', '.join(f.breaks)) + ')' if f.breaks else ''}</li>"
        for f in found
    )
    return f"<p><b>{html.escape(heading)}</b></p><ul>{items}</ul>"


def _column(contract: Contract, spec: MessageSpec, before: MessageSpec | None, since: Contract | None) -> str:
    topic, schema_id = html.escape(spec.topic or "(unrouted)"), html.escape(spec.schema_id)
    parts = [
        f"<p>topic <code>{topic}</code><br>schema <code>{schema_id}</code></p>",
        f"<p>published by {_services(contract, spec)[0]}<br>consumed by {_services(contract, spec)[1]}</p>",
    ]
    if before is not None:
        parts.append(_findings(f"changed from {before.version}", changes(before, spec)))
    if since is not None:
        old = since.messages.get(spec.key)
        parts.append(
            _findings(f"since {old.version}", changes(old, spec)) if old else "<p><b>new</b> since the older schema</p>"
        )
    text = spec.proto if spec.schema is None else json.dumps(spec.schema, indent=2)
    parts.append(f"<pre>{html.escape(text)}</pre>")
    return "".join(parts)


def _type_page(contract: Contract, message_type: str, since: Contract | None) -> str:
    specs = sorted((s for s in contract.messages.values() if s.type == message_type), key=lambda s: s.version.major)
    heads = "".join(f"<th>{html.escape(str(s.version))}</th>" for s in specs)
    cells = "".join(
        f"<td>{_column(contract, spec, specs[i - 1] if i else None, since)}</td>" for i, spec in enumerate(specs)
    )
    body = (
        f'<p><a href="index.html">&larr; all messages</a></p><h1>{html.escape(message_type)}</h1>'
        f"<table><tr>{heads}</tr><tr>{cells}</tr></table>"
    )
    return _page(f"{message_type}: {contract.title}", body)


def _index(contract: Contract) -> str:
    rows = []
    for (message_type, _major), spec in sorted(contract.messages.items()):
        rows.append(
            f'<tr><td><a href="{page_name(message_type)}">{html.escape(message_type)}</a></td>'
            f"<td>{html.escape(str(spec.version))}</td><td><code>{html.escape(spec.topic)}</code></td>"
            "<td>{}</td><td>{}</td></tr>".format(*_services(contract, spec))
        )
    body = (
        f"<h1>{html.escape(contract.title)}: messages</h1><p>Services: {_names(tuple(contract.services()))}. "
        'The AsyncAPI document is <a href="asyncapi.json">asyncapi.json</a>.</p>'
        "<table><tr><th>type</th><th>version</th><th>topic</th><th>published by</th><th>consumed by</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    return _page(f"{contract.title}: messages", body)


def write_catalogue(contract: Contract, out: Path, *, since: Contract | None = None) -> list[Path]:
    """Write ``index.html`` and one page per type into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "index.html"]
    written[0].write_text(_index(contract), encoding="utf-8")
    for message_type in sorted({t for t, _ in contract.messages}):
        path = out / page_name(message_type)
        path.write_text(_type_page(contract, message_type, since), encoding="utf-8")
        written.append(path)
    return written
