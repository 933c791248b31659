from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest
from conftest import SCHEMA_FILE, authedwig_settings

from hedwig_tasks import DecodeError, Message, SchemaError, ValidationError, Version
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.validators.base import Encoded
from hedwig_tasks.validators.jsonschema import JSONSchemaValidator

ROOT = "https://hedwig-tasks.test/schema"


@pytest.fixture(scope="module")
def validator() -> JSONSchemaValidator:
    return JSONSchemaValidator(SCHEMA_FILE)


def user_created(**headers: str) -> Message:
    return Message.new(
        "user-created",
        "1.1",
        {"user_id": "U_1", "profile": {"name": "Ada"}},
        headers=headers or {"request_id": "r-1"},
        publisher="myapp",
    )


@pytest.mark.parametrize("container", [False, True])
def test_round_trip(validator: JSONSchemaValidator, container: bool) -> None:
    message = user_created()
    encoded = validator.encode(message, container=container)
    assert validator.decode(encoded.body, encoded.attributes) == message


def test_attributes_form_bytes(validator: JSONSchemaValidator) -> None:
    message = user_created(request_id="r-1")
    encoded = validator.encode(message)
    assert encoded.body == b'{"user_id":"U_1","profile":{"name":"Ada"}}'
    assert dict(encoded.attributes) == {
        "hedwig_format_version": "1.0",
        "hedwig_id": message.id,
        "hedwig_message_timestamp": str(message.timestamp),
        "hedwig_publisher": "myapp",
        "hedwig_schema": f"{ROOT}#/schemas/user-created/1.1",
        "request_id": "r-1",
    }


def test_container_form_bytes(validator: JSONSchemaValidator) -> None:
    message = user_created(request_id="r-1")
    encoded = validator.encode(message, container=True)
    assert json.loads(encoded.body) == {
        "format_version": "1.0",
        "schema": f"{ROOT}#/schemas/user-created/1.1",
        "id": message.id,
        "metadata": {"timestamp": message.timestamp, "publisher": "myapp", "headers": {"request_id": "r-1"}},
        "data": {"user_id": "U_1", "profile": {"name": "Ada"}},
    }
    assert list(json.loads(encoded.body)) == ["format_version", "schema", "id", "metadata", "data"]
    assert dict(encoded.attributes) == {"request_id": "r-1"}


def test_decimal_and_uuid_encode_like_hedwig(validator: JSONSchemaValidator) -> None:
    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    message = Message.new(
        "send_email", "1.0", {"to": "a@b.c", "subject": "s", "n": Decimal("2"), "f": Decimal("1.5"), "k": key}
    )
    assert validator.encode(message).body == (
        b'{"to":"a@b.c","subject":"s","n":2,"f":1.5,"k":"12345678-1234-5678-1234-567812345678"}'
    )


@pytest.mark.parametrize("container", [False, True])
def test_authedwig_decodes_ours(validator: JSONSchemaValidator, container: bool) -> None:
    message = user_created(request_id="r-1", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    encoded = validator.encode(message, container=container)
    with authedwig_settings(HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES=not container):
        from hedwig.models import Message as HedwigMessage

        theirs = HedwigMessage.deserialize(encoded.body.decode(), dict(encoded.attributes), None)
    assert (theirs.type, str(theirs.version), theirs.id) == ("user-created", "1.1", message.id)
    assert (theirs.timestamp, theirs.publisher) == (message.timestamp, "myapp")
    assert theirs.headers == dict(message.headers)
    assert theirs.data == message.data


@pytest.mark.parametrize("container", [False, True])
def test_we_decode_authedwigs(validator: JSONSchemaValidator, container: bool) -> None:
    with authedwig_settings(HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES=not container):
        from distutils.version import StrictVersion

        from hedwig.models import Message as HedwigMessage

        theirs = HedwigMessage.new(
            "user-created", StrictVersion("1.2"), {"user_id": "U_9"}, headers={"request_id": "q"}
        )
        payload, attributes = theirs.serialize()
    ours = validator.decode(payload.encode(), attributes)
    assert (ours.type, ours.version, ours.id) == ("user-created", Version(1, 2), theirs.id)
    assert (ours.timestamp, ours.publisher) == (theirs.timestamp, "legacy-service")
    assert dict(ours.headers) == {"request_id": "q"}
    assert ours.data == {"user_id": "U_9"}


def test_bad_data_names_the_field_path(validator: JSONSchemaValidator) -> None:
    message = Message.new("send_email", "1.0", {"to": "a@b.c", "subject": "s", "attachments": [{"name": 3}]})
    with pytest.raises(ValidationError, match=r"data\.attachments\[0\]\.name: 3 is not of type 'string'"):
        validator.encode(message)


def test_ref_into_definitions_is_followed(validator: JSONSchemaValidator) -> None:
    with pytest.raises(ValidationError, match=r"data\.profile: 'name' is a required property"):
        validator.encode(Message.new("user-created", "1.0", {"user_id": "U", "profile": {}}))


@pytest.mark.parametrize(
    ("message_type", "version", "match"),
    [
        ("nope", "1.0", "unknown message type 'nope'"),
        ("user-created", "3.0", "'user-created' has no major version 3"),
        ("user-created", "1.3", "minor version 3 is newer than the schema knows"),
    ],
)
def test_publish_side_refusals(validator: JSONSchemaValidator, message_type: str, version: str, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        validator.encode(Message.new(message_type, version, {"user_id": "U"}))


def test_headers_must_be_strings_outside_the_reserved_prefix(validator: JSONSchemaValidator) -> None:
    with pytest.raises(ValidationError, match="reserved"):
        validator.encode(user_created(hedwig_x="1"))


def good_attributes(**changes: str) -> dict[str, str]:
    attributes = {
        "hedwig_format_version": "1.0",
        "hedwig_id": str(uuid.uuid4()),
        "hedwig_message_timestamp": "1795719926586",
        "hedwig_publisher": "other",
        "hedwig_schema": f"{ROOT}#/schemas/user-created/1.0",
    }
    attributes.update(changes)
    return attributes


@pytest.mark.parametrize(
    ("body", "attributes", "match"),
    [
        (b"{not json", good_attributes(), "body is not valid JSON"),
        (b'{"user_id":"U"}', good_attributes(hedwig_schema=f"{ROOT}#/schemas/user-created/5.0"), "no major version 5"),
        (b'{"user_id":"U"}', good_attributes(hedwig_schema=f"{ROOT}#/schemas/nope/1.0"), "unknown message type 'nope'"),
        (
            b'{"user_id":"U"}',
            good_attributes(hedwig_schema="https://elsewhere/schema#/schemas/user-created/1.0"),
            "another schema file",
        ),
        (b'{"user_id":5}', good_attributes(), r"data\.user_id: 5 is not of type 'string'"),
        (b'{"user_id":"U"}', good_attributes(hedwig_message_timestamp="soon"), "not an integer"),
        (b'{"user_id":"U"}', good_attributes(hedwig_format_version="2.0"), "hedwig_format_version"),
        (
            b'{"user_id":"U"}',
            {"hedwig_id": "x", "hedwig_schema": f"{ROOT}#/schemas/user-created/1.0"},
            "missing Hedwig attribute",
        ),
        (b'{"user_id":"U"}', {}, "the container lacks"),
        (b"[1, 2]", {}, "not a Hedwig container"),
    ],
)
def test_decode_refusals_say_which(
    validator: JSONSchemaValidator, body: bytes, attributes: dict[str, str], match: str
) -> None:
    with pytest.raises(DecodeError, match=match):
        validator.decode(body, attributes)


def test_decode_error_is_a_validation_error() -> None:
    assert issubclass(DecodeError, ValidationError)


@pytest.mark.parametrize(
    ("schema", "match"),
    [
        ({"id": "x", "schemas": {}}, "'schemas' must map"),
        ({"id": "x#", "schemas": {"a": {"1.*": {"x-version": "1.0"}}}}, "must not end in '#'"),
        ({"id": "x", "schemas": {"a": {"1.0": {"x-version": "1.0"}}}}, "version keys look like '1.\\*'"),
        ({"id": "x", "schemas": {"a": {"1.*": {}}}}, "missing 'x-version'"),
        ({"id": "x", "schemas": {"a": {"1.*": {"x-version": "2.0"}}}}, "is not of major 1"),
    ],
)
def test_schema_file_checked_at_load(schema: dict[str, object], match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        JSONSchemaValidator(schema)


def test_missing_schema_file_names_it(tmp_path: object) -> None:
    with pytest.raises(SchemaError, match="cannot read schema file"):
        JSONSchemaValidator("/nonexistent/schema.json")


# Minor versions on decode: accepted as Hedwig's consumers do, refused with strict_minor


def schema_knowing(version: str) -> dict[str, Any]:
    """The test schema file with user-created's 1.* at ``version`` and, above 1.2, a new field."""
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    definition = schema["schemas"]["user-created"]["1.*"]
    definition["x-version"] = version
    if Version.parse(version).minor > 2:
        definition["properties"]["nickname"] = {"type": "string"}
    return schema


@pytest.fixture(scope="module")
def strict() -> JSONSchemaValidator:
    return JSONSchemaValidator(SCHEMA_FILE, strict_minor=True)


def from_newer_publisher(container: bool, version: str = "1.7") -> tuple[Message, Encoded]:
    """A user-created message at ``version`` (the test schema knows 1.2), as a newer publisher sends it."""
    message = Message.new(
        "user-created", version, {"user_id": "U_1", "nickname": "Ada"}, headers={"request_id": "r"}, publisher="new"
    )
    return message, JSONSchemaValidator(schema_knowing(version)).encode(message, container=container)


def test_decode_accepts_newer_minors_by_default() -> None:
    assert JSONSchemaValidator(SCHEMA_FILE).strict_minor is False


@pytest.mark.parametrize("container", [False, True])
def test_newer_minor_decoded_against_its_major_keeping_its_version(
    validator: JSONSchemaValidator, container: bool
) -> None:
    sent, encoded = from_newer_publisher(container)
    got = validator.decode(encoded.body, encoded.attributes)
    assert got == sent
    assert got.version == Version(1, 7)
    assert got.data == {"user_id": "U_1", "nickname": "Ada"}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"user_id": 5}, r"user-created 1\.7: data\.user_id: 5 is not of type 'string'"),
        ({"user_id": "U", "profile": {}}, r"user-created 1\.7: data\.profile: 'name' is a required property"),
    ],
)
@pytest.mark.parametrize("container", [False, True])
def test_newer_minor_data_still_validated_against_its_major(
    validator: JSONSchemaValidator, container: bool, data: dict[str, Any], match: str
) -> None:
    schema = f"{ROOT}#/schemas/user-created/1.7"
    if container:
        metadata = {"timestamp": 1, "publisher": "new", "headers": {}}
        envelope = {"format_version": "1.0", "schema": schema, "id": "i", "metadata": metadata, "data": data}
        body, attributes = json.dumps(envelope).encode(), {}
    else:
        body, attributes = json.dumps(data).encode(), good_attributes(hedwig_schema=schema)
    with pytest.raises(DecodeError, match=match):
        validator.decode(body, attributes)


@pytest.mark.parametrize("container", [False, True])
def test_strict_minor_refuses_a_newer_minor_naming_it(strict: JSONSchemaValidator, container: bool) -> None:
    _, encoded = from_newer_publisher(container)
    with pytest.raises(
        DecodeError,
        match=r"user-created 1\.7: minor version 7 is newer than the schema knows \(newest is 1\.2\) "
        "and strict_minor is set",
    ):
        strict.decode(encoded.body, encoded.attributes)


@pytest.mark.parametrize("version", ["1.0", "1.2"])
@pytest.mark.parametrize("container", [False, True])
def test_strict_minor_decodes_the_minors_it_knows(strict: JSONSchemaValidator, container: bool, version: str) -> None:
    sent = Message.new("user-created", version, {"user_id": "U_1"}, publisher="p")
    encoded = strict.encode(sent, container=container)
    assert strict.decode(encoded.body, encoded.attributes) == sent


@pytest.mark.parametrize("strict_minor", [False, True])
def test_encoding_a_newer_minor_is_refused_either_way(strict_minor: bool) -> None:
    validator = JSONSchemaValidator(SCHEMA_FILE, strict_minor=strict_minor)
    with pytest.raises(ValidationError, match=r"minor version 3 is newer than the schema knows \(newest is 1\.2\)$"):
        validator.encode(Message.new("user-created", "1.3", {"user_id": "U"}))


def test_strict_minor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        JSONSchemaValidator(SCHEMA_FILE, True)  # type: ignore[call-arg]


@pytest.mark.parametrize("container", [False, True])
def test_we_decode_authedwigs_newer_minor(container: bool) -> None:
    """authedwig publishing 1.2 with the test schema; our consumer's schema knows only 1.0."""
    ours = JSONSchemaValidator(schema_knowing("1.0"))
    with authedwig_settings(HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES=not container):
        from distutils.version import StrictVersion

        from hedwig.models import Message as HedwigMessage

        theirs = HedwigMessage.new("user-created", StrictVersion("1.2"), {"user_id": "U_9"}, headers={"r": "q"})
        payload, attributes = theirs.serialize()
    got = ours.decode(payload.encode(), attributes)
    assert (got.type, got.version, got.id, got.data) == ("user-created", Version(1, 2), theirs.id, {"user_id": "U_9"})
    with pytest.raises(DecodeError, match="minor version 2 is newer"):
        JSONSchemaValidator(schema_knowing("1.0"), strict_minor=True).decode(payload.encode(), attributes)


def test_a_body_nested_too_deep_to_parse_is_a_decode_error() -> None:
    validator = JSONSchemaValidator(SCHEMA_FILE)
    attributes = {
        "hedwig_format_version": "1.0",
        "hedwig_id": "6a8d6c4e-5d0e-4b8e-9a59-6ad1c0d3b1f1",
        "hedwig_message_timestamp": "1795719926586",
        "hedwig_publisher": "other",
        "hedwig_schema": f"{validator.root}#/schemas/user-created/1.0",
    }
    with pytest.raises(DecodeError, match="nested too deep to parse"):
        validator.decode(b"[" * 100_000, attributes)


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_id":"U_1"}',
        b' \n{"user_id": "U_1"}\t',  # whitespace around the value
        b'\xef\xbb\xbf{"user_id":"U_1"}',  # a UTF-8 byte order mark
        '{"user_id":"U_1"}'.encode("utf-16"),
        '{"user_id":"U_1"}'.encode("utf-32-le"),
    ],
)
def test_decode_reads_every_body_json_loads_reads(validator: JSONSchemaValidator, body: bytes) -> None:
    assert json.loads(body) == {"user_id": "U_1"}
    assert validator.decode(body, good_attributes()).data == {"user_id": "U_1"}


@pytest.mark.parametrize("body", [b'{"user_id":"U_1"} x', b'{"user_id":"U_1"', b"\xff{}", b""])
def test_decode_refuses_every_body_json_loads_refuses(validator: JSONSchemaValidator, body: bytes) -> None:
    with pytest.raises(ValueError) as refused:
        json.loads(body)
    with pytest.raises(DecodeError, match="body is not valid JSON") as ours:
        validator.decode(body, good_attributes())
    assert str(refused.value) in str(ours.value)


@pytest.mark.parametrize("container", [False, True])
def test_decode_delivery_attaches_the_delivery_as_it_builds_the_message(
    validator: JSONSchemaValidator, container: bool
) -> None:
    message = user_created()
    encoded = validator.encode(message, container=container)
    delivery = Delivery(encoded.body, dict(encoded.attributes), attempt=3, receipt=None, subscription="s")
    got = validator.decode_delivery(encoded.body, encoded.attributes, delivery)
    assert got == message
    assert got.delivery is delivery and got.attempt == 3
    assert validator.decode(encoded.body, encoded.attributes).delivery is None


def test_decode_delivery_asks_a_subclass_that_decodes_its_own_way() -> None:
    class Tagging(JSONSchemaValidator):
        def decode(self, body: bytes, attributes: Mapping[str, str]) -> Message:
            decoded = super().decode(body, attributes)
            return Message.new(decoded.type, decoded.version, {**decoded.data, "tagged": "yes"}, id=decoded.id)

    validator = Tagging(SCHEMA_FILE)
    encoded = validator.encode(user_created())
    delivery = Delivery(encoded.body, dict(encoded.attributes), attempt=1, receipt=None, subscription="s")
    got = validator.decode_delivery(encoded.body, encoded.attributes, delivery)
    assert got.data["tagged"] == "yes"
    assert got.delivery is delivery
