"""What the dashboard's JSON API answers: subscriptions, workers, dead letters, schemas.

Each function takes the app (and the sampler) and returns plain JSON-able data; the HTTP server
in :mod:`hedwig_tasks.dashboard.server` only routes and guards. Dead letters are filtered with
the ``hedwig-tasks dlq`` command's own filters (:mod:`hedwig_tasks._cli_dlq`), over the oldest
``scan`` of them, read once and kept for a few seconds so that paging through 10,000 of them
reads the broker once, not once a page.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hedwig_tasks._cli_dlq import (
    DEFAULT_SCAN,
    as_json,
    dead_letter_total,
    parse_age,
    record_filters,
    type_and_version,
)
from hedwig_tasks._version import __version__
from hedwig_tasks.exceptions import ConfigurationError, HedwigError
from hedwig_tasks.transports.base import DeadLetterRecord

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig
    from hedwig_tasks.dashboard.sampler import Sampler

__all__ = ["DeadLetterBrowser", "meta", "schemas", "subscriptions", "workers"]

#: Dead letters on a page of the browser, unless the page asks for another size (at most 200).
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
#: How long a read of the dead letters serves the pages after it, in seconds.
DEAD_LETTER_CACHE_S = 3.0
#: Characters of a reason a row of the list shows (the full view shows all of it).
REASON_CHARS = 200

FILTER_FIELDS = ("subscription", "type", "reason", "older_than", "newer_than")


class BadRequest(HedwigError, ValueError):
    """A request the API cannot answer as asked: ``str()`` says which field and why."""


def meta(app: Hedwig, *, refresh_s: float, token_required: bool) -> dict[str, Any]:
    """What the page header shows: the app, its queue and transport (password masked)."""
    from hedwig_tasks.cli import transport_text

    return {
        "app": app.name,
        "queue": app.queue,
        "transport": transport_text(app),
        "version": __version__,
        "refresh_s": refresh_s,
        "token_required": token_required,
    }


def subscriptions(sampler: Sampler) -> dict[str, Any]:
    """The last counts of each subscription and the last hour of samples, as series."""
    rows, samples = sampler.history()
    series: dict[str, dict[str, list[Any]]] = {}
    for sample in samples:
        for name, values in sample.subscriptions.items():
            found = series.setdefault(name, {"t": [], "depth": [], "in_flight": [], "dead_letters": [], "oldest_s": []})
            found["t"].append(round(sample.t, 3))
            for key, value in zip(("depth", "in_flight", "dead_letters", "oldest_s"), values, strict=True):
                found[key].append(value)
    return {
        "error": sampler.error,
        "rows": [
            {
                "subscription": row.subscription,
                "topic": row.topic,
                "depth": row.depth,
                "in_flight": row.in_flight,
                "dead_letters": row.dead_letters,
                "details": dict(row.details),
                "unknown_because": row.unknown_because,
                "series": series.get(row.subscription, {}),
            }
            for row in rows
        ],
        "throughput": {
            "t": [round(s.t, 3) for s in samples],
            "per_s": [s.throughput_per_s for s in samples],
        },
    }


def workers(app: Hedwig) -> dict[str, Any]:
    """The app's live workers from their heartbeat rows, each with what it is running."""
    from hedwig_tasks._worker_heartbeat import group

    try:
        store = app.state
        members, now = store.members(group(app.name)), store.now()
    except HedwigError as exc:
        return {"error": f"the state store could not be read: {exc}", "workers": []}
    rows = []
    for member in members:
        data = dict(member.data)
        running = [
            {"id": str(m.get("id", "")), "type": str(m.get("type", "")), "for_s": round(now - m.get("since", now), 1)}
            for m in data.pop("running", [])
        ]
        rows.append({**data, "worker": member.member, "seen_s": round(now - member.seen, 1), "running": running})
    return {"error": "", "now": now, "workers": rows}


def schemas(app: Hedwig) -> list[dict[str, Any]]:
    """Each message type and major the app knows: newest version, definition, handler, topic."""
    found = []
    for message_type, major in sorted(app.validator.known_types()):
        handler = next((h for h in app.registry if h.message_type == message_type and major in h.majors), None)
        try:
            topic = app.router.topic_for(message_type, major)
        except HedwigError:
            topic = ""
        found.append(
            {
                "type": message_type,
                "major": major,
                "version": str(app.validator.latest_version(message_type, major)),
                "handler": handler.name if handler else "",
                "topic": topic,
                **_definition(app, message_type, major),
            }
        )
    return found


def _definition(app: Hedwig, message_type: str, major: int) -> dict[str, str]:
    validator: Any = app.validator
    if hasattr(validator, "message_class"):
        return {"format": "protobuf", "definition": _proto_text(validator.message_class(message_type, major))}
    definition = validator.schema["schemas"][message_type][f"{major}.*"]
    return {"format": "JSON Schema", "definition": json.dumps(definition, indent=2, sort_keys=True)}


def _proto_text(cls: Any) -> str:
    """A ``message`` block for a protobuf class: its fields with their types and numbers."""
    from google.protobuf.descriptor import FieldDescriptor

    names = {
        value: name.removeprefix("TYPE_").lower()
        for name, value in vars(FieldDescriptor).items()
        if name.startswith("TYPE_")
    }
    lines = [f"message {cls.DESCRIPTOR.full_name} {{"]
    for field in cls.DESCRIPTOR.fields:
        kind = field.message_type.full_name if field.message_type else names.get(field.type, "?")
        repeated = "repeated " if getattr(field, "is_repeated", field.label == FieldDescriptor.LABEL_REPEATED) else ""
        lines.append(f"  {repeated}{kind} {field.name} = {field.number};")
    return "\n".join([*lines, "}"])


# -- dead letters ---------------------------------------------------------------------------


def _namespace(query: Mapping[str, str]) -> argparse.Namespace:
    """The ``dlq`` command's filter options from a query; :class:`BadRequest` for a bad age."""
    values: dict[str, Any] = {name: (query.get(name) or "").strip() or None for name in FILTER_FIELDS}
    for age in ("older_than", "newer_than"):
        if values[age] is not None:
            try:
                values[age] = parse_age(values[age])
            except argparse.ArgumentTypeError as exc:
                raise BadRequest(f"{age.replace('_', ' ')}: {exc}") from None
    return argparse.Namespace(**values)


def _summary(record: DeadLetterRecord) -> dict[str, Any]:
    message_type, version = type_and_version(record)
    reason = " ".join(record.reason.split())
    return {
        "id": record.transport_id,
        "type": message_type,
        "version": version,
        "subscription": record.subscription,
        "attempts": record.attempts,
        "dead_at": record.dead_at,
        "reason": reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "...",
    }


class DeadLetterBrowser:
    """Pages of an app's dead letters, filtered; the oldest ``scan`` read once per few seconds."""

    def __init__(self, app: Hedwig, *, scan: int = DEFAULT_SCAN) -> None:
        self.app = app
        self.scan = scan
        self._read: tuple[float, list[DeadLetterRecord]] | None = None
        self._lock = threading.Lock()

    def _records(self) -> list[DeadLetterRecord]:
        with self._lock:
            if self._read is None or time.monotonic() - self._read[0] > DEAD_LETTER_CACHE_S:
                self._read = (time.monotonic(), self.app.transport.dead_letters(self.app.queue, limit=self.scan))
            return self._read[1]

    def forget(self) -> None:
        """Read them again next time (after a requeue or a purge)."""
        with self._lock:
            self._read = None

    def matching(self, query: Mapping[str, str]) -> list[DeadLetterRecord]:
        tests = record_filters(_namespace(query))
        return [r for r in self._records() if all(test(r) for test in tests)]

    def page(self, query: Mapping[str, str]) -> dict[str, Any]:
        """One page of the dead letters that pass the query's filters, oldest first.

        Without filters only the oldest up to the page's end are read; with filters the oldest
        ``scan`` are, once for the pages that follow (see :data:`DEAD_LETTER_CACHE_S`).
        """
        page, size = _number(query, "page", 0), min(_number(query, "size", DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        total = dead_letter_total(self.app)
        if record_filters(_namespace(query)):
            read = self._records()
            found = self.matching(query)
            matching, seen = len(found), len(read)
        else:
            found = self.app.transport.dead_letters(self.app.queue, limit=min((page + 1) * size, self.scan))
            matching = len(found) if total is None else min(total, self.scan)
            seen = matching
        return {
            "total": total,
            "read": seen,
            "scan": self.scan,
            "matching": matching,
            "page": page,
            "size": size,
            "rows": [_summary(r) for r in found[page * size : (page + 1) * size]],
            "types": sorted({t for t, _ in self.app.validator.known_types()}),
            "subscriptions": self.app.subscribed_topics(),
        }

    def one(self, record_id: str) -> dict[str, Any] | None:
        """One dead letter in full, with its body pretty-printed when it is JSON; None if gone."""
        found = self.app.transport.dead_letters(self.app.queue, limit=1, ids=[record_id])
        if not found:
            return None
        described = as_json(found[0])
        described["dead_at_epoch"] = found[0].dead_at
        described["headers"] = {k: v for k, v in described["attributes"].items() if not k.startswith("hedwig_")}
        if "body" in described:
            try:
                described["body"] = json.dumps(json.loads(described["body"]), indent=2, ensure_ascii=False)
            except ValueError:
                pass
        return described

    def act(self, verb: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Requeue or purge the ids the request names, or every dead letter its filter matches."""
        ids = request.get("ids")
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not ids:
                raise BadRequest("ids: a non-empty list of dead-letter ids")
        else:
            query = request.get("filter")
            if not isinstance(query, dict):
                raise BadRequest("give ids (a list) or filter (an object of the list's filters)")
            ids = [r.transport_id for r in self.matching({k: str(v) for k, v in query.items()})]
        method = self.app.transport.requeue_dead_letters if verb == "requeue" else self.app.transport.purge_dead_letters
        try:
            done = method(self.app.queue, ids=ids) if ids else 0
        except ConfigurationError as exc:
            raise BadRequest(str(exc)) from None
        finally:
            self.forget()
        return {"verb": verb, "asked": len(ids), "done": done}


def _number(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name) or ""
    if not text:
        return default
    if not text.isdigit():
        raise BadRequest(f"{name}: expected a whole number, got {text!r}")
    return int(text)
