"""Reading the SQLite bus's rows into deliveries: whatever another writer stored, never failing.

A row the transport wrote itself takes the fast path (a blob body, a JSON object of strings, an
attempt count that is a whole number); any other row is read field by field, and what cannot
be read is named in the delivery's ``fault`` so the worker dead-letters it with that reason.
"""

from __future__ import annotations

import json

from hedwig_tasks.transports.base import Delivery

__all__ = ["Row", "attributes_of", "delivery", "text_of", "whole"]

# id, lease (the attempt number), typeof(body), then body, attributes and message_id as bytes
Row = tuple[int, object, str, bytes, bytes, bytes]

#: SQLite storage classes a body can have that no publisher wrote (text is its UTF-8 bytes).
_STORAGE = {"integer": "an integer", "real": "a real"}
#: JSON's names for the Python types ``json.loads`` returns.
_JSON_TYPES = {
    list: "a JSON array",
    str: "a JSON string",
    int: "a JSON number",
    float: "a JSON number",
    bool: "JSON true or false",
}
#: Parses a JSON document that starts at the first character, returning it and where it ended.
_raw_decode = json.JSONDecoder().raw_decode


def delivery(subscription: str, row: Row) -> Delivery:
    """The row as a Delivery; whatever of its own fields cannot be read is named in its ``fault``."""
    row_id, lease, body_type, body, raw_attributes, raw_message_id = row
    if body_type == "blob" and type(lease) is int and lease >= 1:
        try:
            text = raw_attributes.decode()
            attributes, end = _raw_decode(text)
            # joining the values raises TypeError unless every one is a str, at C speed
            if end == len(text) and type(attributes) is dict and "".join(attributes.values()) is not None:
                return Delivery(body, attributes, lease, (row_id, lease), subscription, raw_message_id.decode())
        except (ValueError, TypeError, AttributeError, RecursionError):  # the checked path says what is wrong
            pass
    return _checked_delivery(subscription, row)


def _checked_delivery(subscription: str, row: Row) -> Delivery:
    row_id, lease, body_type, body, raw_attributes, raw_message_id = row
    attributes, attributes_fault = attributes_of(raw_attributes)
    message_id, message_id_fault = text_of(raw_message_id, "message id is")
    faults = [
        f"body is {_STORAGE[body_type]}, not bytes" if body_type in _STORAGE else "",
        attributes_fault,
        message_id_fault,
        "" if whole(lease) == lease else f"attempt count {lease!r} is not a whole number of 1 or more",
    ]
    fault = "; ".join(f for f in faults if f)
    return Delivery(bytes(body), attributes, whole(lease), (row_id, lease), subscription, message_id, fault)


def whole(value: object) -> int:
    """A stored attempt count as an int, 1 where it is not a whole number of 1 or more."""
    return value if type(value) is int and value >= 1 else 1


def text_of(raw: bytes, what: str) -> tuple[str, str]:
    """``raw`` as text, and a fault (empty if none) that starts with ``what`` ("message id is")."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as exc:  # kept, escaped, for the log line and the dead letter
        return raw.decode("utf-8", "backslashreplace"), f"{what} not UTF-8 ({exc.reason} at byte {exc.start})"


def attributes_of(raw: bytes) -> tuple[dict[str, str], str]:
    """The attributes column read as a JSON object of strings, or ``{}`` and why it is not one."""
    text, fault = text_of(raw, "attributes are")
    if fault:
        return {}, f"{fault}: {text[:80]!r}"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        return {}, f"attributes are not JSON ({exc}): {text[:80]!r}"
    if not isinstance(value, dict):
        return {}, f"attributes are {_JSON_TYPES.get(type(value), 'JSON null')}, not an object: {text[:80]!r}"
    for key, item in value.items():
        if not isinstance(item, str):
            return {}, f"attribute {key!r} is {repr(item)[:80]}, not a string"
    return value, ""
