from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import authedwig_settings

from hedwig_tasks import DecodeError, Message, SchemaError, ValidationError, Version
from hedwig_tasks.transports.base import Delivery
from hedwig_tasks.validators.protobuf import ProtobufValidator, messages_of
from hedwig_tasks.validators.protobuf_container_pb2 import PayloadV1

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # authedwig's modules import distutils
    from examples.protos import schema_pb2
    from examples.protos.schema_pb2 import UserCreatedV1, UserUpdatedV1
    from protos import cases_pb2

TESTS = Path(__file__).parent
MESSAGE_ID = "a9c8e3b2-1f4d-4e5a-8b7c-6d5e4f3a2b1c"
TIMESTAMP_MS = 1795719935116  # not a whole second, so millisecond precision is checked
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def validator() -> ProtobufValidator:
    return ProtobufValidator([UserCreatedV1, UserUpdatedV1])


@contextlib.contextmanager
def authedwig(*, container: bool) -> Iterator[Any]:
    """authedwig 11's own ProtobufValidator over the same classes, set up for one form."""
    with authedwig_settings(
        HEDWIG_PROTOBUF_MESSAGES=[UserCreatedV1, UserUpdatedV1],
        HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES=not container,
    ):
        from hedwig.validators.protobuf import ProtobufValidator as AuthedwigProtobufValidator

        yield AuthedwigProtobufValidator()


def user_created(data: Any = None, **headers: str) -> Message:
    return Message.new(
        "user-created",
        "1.0",
        UserCreatedV1(user_id="U_1234") if data is None else data,
        headers=headers or {"request_id": "req-42"},
        id=MESSAGE_ID,
        publisher="myapp",
        timestamp=TIMESTAMP_MS,
    )


def good_attributes(**changes: str) -> dict[str, str]:
    attributes = {
        "hedwig_format_version": "1.0",
        "hedwig_id": MESSAGE_ID,
        "hedwig_message_timestamp": str(TIMESTAMP_MS),
        "hedwig_publisher": "other",
        "hedwig_schema": "user-created/1.0",
    }
    attributes.update(changes)
    return attributes


def container(*, data: Any = None, data_value: bytes | None = None, **changes: Any) -> bytes:
    """A container body built field by field, with ``changes`` applied to the PayloadV1."""
    payload = PayloadV1(format_version="1.0", id=MESSAGE_ID, schema="user-created/1.0")
    payload.metadata.publisher = "other"
    payload.metadata.headers.update(changes.pop("headers", {}))
    payload.data.Pack(UserCreatedV1(user_id="U_1") if data is None else data)
    if data_value is not None:
        payload.data.value = data_value
    for name, value in changes.items():
        setattr(payload, name, value)
    body: bytes = payload.SerializeToString()
    return body


# Round trips and the exact bytes


@pytest.mark.parametrize("container_form", [False, True])
def test_round_trip(validator: ProtobufValidator, container_form: bool) -> None:
    message = user_created(request_id="req-42", traceparent=TRACEPARENT)
    encoded = validator.encode(message, container=container_form)
    assert encoded.binary
    decoded = validator.decode(encoded.body, encoded.attributes)
    assert decoded == message
    assert type(decoded.data) is UserCreatedV1


def test_attributes_form_bytes(validator: ProtobufValidator) -> None:
    encoded = validator.encode(user_created(request_id="req-42"))
    assert encoded.body == b"\n\x06U_1234"  # as captured from authedwig on SNS/SQS and Pub/Sub
    assert dict(encoded.attributes) == {
        "hedwig_format_version": "1.0",
        "hedwig_id": MESSAGE_ID,
        "hedwig_message_timestamp": str(TIMESTAMP_MS),
        "hedwig_publisher": "myapp",
        "hedwig_schema": "user-created/1.0",
        "request_id": "req-42",
    }


def test_container_form_fields(validator: ProtobufValidator) -> None:
    encoded = validator.encode(user_created(request_id="req-42"), container=True)
    payload = PayloadV1.FromString(encoded.body)
    assert (payload.format_version, payload.id, payload.schema) == ("1.0", MESSAGE_ID, "user-created/1.0")
    assert (payload.metadata.timestamp.seconds, payload.metadata.timestamp.nanos) == (1795719935, 116_000_000)
    assert (payload.metadata.publisher, dict(payload.metadata.headers)) == ("myapp", {"request_id": "req-42"})
    assert payload.data.type_url == "type.googleapis.com/hedwig_examples.UserCreatedV1"
    assert payload.data.value == b"\n\x06U_1234"
    assert dict(encoded.attributes) == {"request_id": "req-42"}


@pytest.mark.parametrize("container_form", [False, True])
def test_dict_data_encodes_like_the_instance(validator: ProtobufValidator, container_form: bool) -> None:
    from_dict = validator.encode(user_created({"user_id": "U_1234"}), container=container_form)
    from_instance = validator.encode(user_created(), container=container_form)
    assert from_dict == from_instance


# Interoperability with authedwig 11, byte for byte, both ways and both forms


def authedwig_message(message: Message) -> Any:
    from distutils.version import StrictVersion

    from hedwig.models import Message as AuthedwigMessage
    from hedwig.models import Metadata as AuthedwigMetadata

    metadata = AuthedwigMetadata(
        timestamp=message.timestamp, publisher=message.publisher, headers=dict(message.headers)
    )
    version = StrictVersion(str(message.version))
    return AuthedwigMessage(data=message.data, type=message.type, version=version, id=message.id, metadata=metadata)


@pytest.mark.parametrize("container_form", [False, True])
def test_bytes_identical_to_authedwigs(validator: ProtobufValidator, container_form: bool) -> None:
    message = user_created(request_id="req-42", traceparent=TRACEPARENT)
    ours = validator.encode(message, container=container_form)
    with authedwig(container=container_form) as theirs:
        body, attributes = theirs.serialize(authedwig_message(message))
    assert (ours.body, dict(ours.attributes)) == (body, attributes)


@pytest.mark.parametrize("container_form", [False, True])
def test_authedwig_decodes_ours(validator: ProtobufValidator, container_form: bool) -> None:
    message = user_created(request_id="req-42", traceparent=TRACEPARENT)
    encoded = validator.encode(message, container=container_form)
    with authedwig(container=container_form) as theirs:
        decoded = theirs.deserialize(encoded.body, dict(encoded.attributes), None)
    assert (decoded.type, str(decoded.version), decoded.id) == ("user-created", "1.0", MESSAGE_ID)
    assert (decoded.timestamp, decoded.publisher) == (TIMESTAMP_MS, "myapp")
    assert decoded.headers == {"request_id": "req-42", "traceparent": TRACEPARENT}
    assert decoded.data == UserCreatedV1(user_id="U_1234")


@pytest.mark.parametrize("container_form", [False, True])
def test_we_decode_authedwigs(validator: ProtobufValidator, container_form: bool) -> None:
    sent = Message.new(
        "user-updated",
        "1.0",
        UserUpdatedV1(user_id="U_9"),
        headers={"request_id": "q", "traceparent": TRACEPARENT},
        publisher="legacy-service",
        timestamp=TIMESTAMP_MS + 1,
    )
    with authedwig(container=container_form) as theirs:
        body, attributes = theirs.serialize(authedwig_message(sent))
    decoded = validator.decode(body, attributes)
    assert (decoded.type, decoded.version, decoded.id) == ("user-updated", Version(1, 0), sent.id)
    assert (decoded.timestamp, decoded.publisher) == (TIMESTAMP_MS + 1, "legacy-service")
    assert dict(decoded.headers) == {"request_id": "q", "traceparent": TRACEPARENT}
    assert decoded.data == UserUpdatedV1(user_id="U_9")


def test_sub_millisecond_timestamps_truncate_like_authedwig(validator: ProtobufValidator) -> None:
    payload = PayloadV1.FromString(container())
    payload.metadata.timestamp.seconds, payload.metadata.timestamp.nanos = 1795719935, 116_999_999
    body = payload.SerializeToString()
    with authedwig(container=True) as theirs:
        expected = theirs.deserialize(body, {}, None).timestamp
    assert validator.decode(body, {}).timestamp == expected == TIMESTAMP_MS


# Classes compiled against hedwig_tasks' own option file (in a subprocess: see own_options_check.py)


@pytest.fixture(scope="module")
def own_options_report() -> dict[str, Any]:
    paths = [str(TESTS), str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    result = subprocess.run(
        [sys.executable, "-W", "error", str(TESTS / "protos" / "own_options_check.py")],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_own_option_classes_round_trip(own_options_report: dict[str, Any]) -> None:
    assert own_options_report["authedwig_loaded"] is False
    assert own_options_report["known"] == [["OrderPlaced", 2], ["user-created", 1]]
    assert own_options_report["latest"] == {"OrderPlaced/2": "2.1", "user-created/1": "1.0"}
    assert own_options_report["round_trips"] == [True, True, True, True]


def test_authedwig_reads_own_option_classes(own_options_report: dict[str, Any]) -> None:
    sent = own_options_report["user_created"]["attributes"]
    with authedwig(container=False) as theirs:
        decoded = theirs.deserialize(bytes.fromhex(sent["body"]), sent["attributes"], None)
    assert (decoded.type, decoded.publisher, decoded.timestamp) == ("user-created", "shop", TIMESTAMP_MS)
    assert decoded.data == UserCreatedV1(user_id="U_7")


def test_container_of_another_class_is_refused_like_authedwig(
    validator: ProtobufValidator, own_options_report: dict[str, Any]
) -> None:
    sent = own_options_report["user_created"]["container"]
    body = bytes.fromhex(sent["body"])
    expected = (
        r"container data is 'type.googleapis.com/hedwig_tasks_tests.own.UserCreatedV1', "
        r"but user-created/1.0 is type.googleapis.com/hedwig_examples.UserCreatedV1"
    )
    with pytest.raises(DecodeError, match=expected):
        validator.decode(body, sent["attributes"])
    with authedwig(container=True) as theirs:
        from hedwig.exceptions import ValidationError as AuthedwigValidationError

        with pytest.raises(AuthedwigValidationError):
            theirs.deserialize(body, sent["attributes"], None)


# Reading the classes


def test_type_from_option_or_class_name() -> None:
    validator = ProtobufValidator([UserCreatedV1, cases_pb2.InferredV2])
    assert sorted(validator.known_types()) == [("Inferred", 2), ("user-created", 1)]
    assert validator.latest_version("Inferred", 2) == Version(2, 3)
    assert validator.latest_version("user-created", 1) == Version(1, 0)
    assert validator.message_class("Inferred", 2) is cases_pb2.InferredV2


def test_messages_of_a_module_skips_classes_without_the_option() -> None:
    assert messages_of(schema_pb2) == [UserCreatedV1, UserUpdatedV1]
    found = messages_of(cases_pb2)
    assert cases_pb2.ProfileV1 in found
    assert cases_pb2.Plain not in found and cases_pb2.Address not in found


def test_messages_of_refuses_a_module_that_is_not_protoc_output() -> None:
    with pytest.raises(SchemaError, match="not a protoc-generated _pb2 module"):
        messages_of(json)


@pytest.mark.parametrize(
    ("classes", "match"),
    [
        ([cases_pb2.NoMajorV1], r"NoMajorV1: message_options\.major_version is missing"),
        ([UserCreatedV1, cases_pb2.OtherUserCreatedV1], r"'user-created' major 1 is already hedwig_examples\."),
        ([cases_pb2.NameSaysV2], "the class name says major 2, major_version says 1"),
        ([cases_pb2.Nameless], r"Nameless: no message_type option, and the class name is not '<Type>V<major>'"),
        ([cases_pb2.SlashedV1], "must not contain '/'"),
        ([cases_pb2.Plain], r"Plain: no Hedwig message_options option \(extension 51235\)"),
        ([{"user_id": "U"}], "is not a protobuf message class"),
        ([], "no message classes given"),
    ],
)
def test_bad_classes_refused_at_construction(classes: list[Any], match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        ProtobufValidator(classes)


def test_every_bad_class_is_listed_at_once() -> None:
    with pytest.raises(SchemaError, match=r"NoMajorV1.*Nameless"):
        ProtobufValidator([UserCreatedV1, cases_pb2.NoMajorV1, cases_pb2.Nameless])


# Refusals at publish


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (user_created({"user_id": "U", "nick": "x"}), r'user-created 1\.0: data: .*no field named "nick"'),
        (user_created(UserUpdatedV1(user_id="U")), r"data must be a hedwig_examples\.UserCreatedV1 or a dict"),
        (user_created("U_1"), "got str"),
        (Message.new("nope", "1.0", {}), "unknown message type 'nope'"),
        (Message.new("user-created", "2.0", {}), "'user-created' has no major version 2"),
        (Message.new("user-created", "1.1", {}), "minor version 1 is newer than the schema knows"),
        (user_created(hedwig_x="1"), "reserved"),
    ],
)
def test_publish_side_refusals(validator: ProtobufValidator, message: Message, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        validator.encode(message)


def test_dict_error_names_the_nested_field() -> None:
    validator = ProtobufValidator([cases_pb2.ProfileV1])
    message = Message.new("profile", "1.0", {"name": "Ada", "address": {"town": "London"}})
    with pytest.raises(ValidationError, match=r'no field named "town" at "ProfileV1\.address"'):
        validator.encode(message)


# Refusals at decode


@pytest.mark.parametrize(
    ("body", "attributes", "match"),
    [
        (b"not protobuf", good_attributes(), r"body is not a valid hedwig_examples\.UserCreatedV1"),
        (b"\n\x01U", {"hedwig_id": MESSAGE_ID}, "missing Hedwig attribute"),
        (b"\n\x01U", good_attributes(hedwig_schema="nope/1.0"), "unknown message type 'nope'"),
        (b"\n\x01U", good_attributes(hedwig_schema="user-created/3.0"), "'user-created' has no major version 3"),
        (b"\n\x01U", good_attributes(hedwig_schema="user-created"), "invalid schema 'user-created'"),
        (b"\n\x01U", good_attributes(hedwig_format_version="2.0"), "hedwig_format_version"),
        (b"\n\x01U", good_attributes(hedwig_message_timestamp="soon"), "not an integer"),
        (b"\n\x20", {}, "missing Hedwig attributes, and the body is not a Hedwig PayloadV1"),
        (b"\n\x01U", {}, "missing Hedwig attributes, and the container lacks: id, schema, data"),
        (container(format_version="2.0"), {}, "unknown container format_version '2.0'"),
        (container(schema="nope/1.0"), {}, "unknown message type 'nope'"),
        (container(headers={"hedwig_x": "1"}), {}, "invalid container metadata: header 'hedwig_x'"),
        (
            container(data=UserUpdatedV1(user_id="U")),
            {},
            "container data is 'type.googleapis.com/hedwig_examples.UserUpdatedV1', but user-created/1.0 is "
            "type.googleapis.com/hedwig_examples.UserCreatedV1",
        ),
        (container(data_value=b"\xff"), {}, r"container data is not a valid hedwig_examples\.UserCreatedV1"),
    ],
)
def test_decode_refusals_say_which(
    validator: ProtobufValidator, body: bytes, attributes: dict[str, str], match: str
) -> None:
    with pytest.raises(DecodeError, match=match):
        validator.decode(body, attributes)


# Minor versions on decode: accepted as Hedwig's consumers do, refused with strict_minor


def knowing_minor(cls: Any, minor: int, **new_fields: int) -> Any:
    """``cls`` as a newer publisher has it: the same full name, ``minor_version`` set to ``minor``
    and string fields ``new_fields`` (name to field number) added.

    It is built in a descriptor pool of its own, since the default pool already holds ``cls``.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from hedwig.protobuf import options_pb2

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: Any, proto: Any = None) -> None:
        for dependency in file.dependencies:
            add(dependency)
        if file.name not in added:
            if proto is None:
                proto = descriptor_pb2.FileDescriptorProto()
                file.CopyToProto(proto)
            pool.Add(proto)
            added.add(file.name)

    file = descriptor_pb2.FileDescriptorProto()
    cls.DESCRIPTOR.file.CopyToProto(file)
    [message] = [m for m in file.message_type if m.name == cls.DESCRIPTOR.name]
    message.options.Extensions[options_pb2.message_options].minor_version = minor
    for name, number in new_fields.items():
        message.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    add(cls.DESCRIPTOR.file, file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(cls.DESCRIPTOR.full_name))


UserCreatedV1_3 = knowing_minor(UserCreatedV1, 3, nickname=2)


@pytest.fixture(scope="module")
def strict() -> ProtobufValidator:
    return ProtobufValidator([UserCreatedV1, UserUpdatedV1], strict_minor=True)


def from_newer_publisher(container_form: bool) -> tuple[Message, Any]:
    """A user-created 1.3 message (the consumer's class knows 1.0) with a field 1.0 lacks."""
    sent = dataclasses.replace(user_created(UserCreatedV1_3(user_id="U_1", nickname="Ada")), version=Version(1, 3))
    return sent, ProtobufValidator([UserCreatedV1_3]).encode(sent, container=container_form)


def test_the_newer_class_is_what_a_publisher_at_1_3_has() -> None:
    assert UserCreatedV1_3.DESCRIPTOR.full_name == UserCreatedV1.DESCRIPTOR.full_name
    assert ProtobufValidator([UserCreatedV1_3]).latest_version("user-created", 1) == Version(1, 3)


@pytest.mark.parametrize("container_form", [False, True])
def test_newer_minor_decoded_with_the_class_of_its_major(validator: ProtobufValidator, container_form: bool) -> None:
    sent, encoded = from_newer_publisher(container_form)
    got = validator.decode(encoded.body, encoded.attributes)
    assert (got.type, got.version, got.id, got.headers) == ("user-created", Version(1, 3), sent.id, sent.headers)
    assert (got.publisher, got.timestamp) == (sent.publisher, sent.timestamp)
    assert type(got.data) is UserCreatedV1
    assert got.data.user_id == "U_1"
    assert got.data.SerializeToString() == sent.data.SerializeToString()  # the unknown field is kept


@pytest.mark.parametrize(
    ("body", "attributes", "match"),
    [
        (b"not protobuf", good_attributes(hedwig_schema="user-created/1.3"), r"body is not a valid hedwig_examples"),
        (b"\n\x01U", good_attributes(hedwig_schema="user-created/2.3"), "'user-created' has no major version 2"),
        (
            container(schema="user-created/1.3", data=UserUpdatedV1(user_id="U")),
            {},
            "container data is 'type.googleapis.com/hedwig_examples.UserUpdatedV1', but user-created/1.3 is",
        ),
    ],
)
def test_newer_minor_still_checked_against_its_major(
    validator: ProtobufValidator, body: bytes, attributes: dict[str, str], match: str
) -> None:
    with pytest.raises(DecodeError, match=match):
        validator.decode(body, attributes)


@pytest.mark.parametrize("container_form", [False, True])
def test_strict_minor_refuses_a_newer_minor_naming_it(strict: ProtobufValidator, container_form: bool) -> None:
    _, encoded = from_newer_publisher(container_form)
    with pytest.raises(
        DecodeError,
        match=r"user-created 1\.3: minor version 3 is newer than the schema knows \(newest is 1\.0\) "
        "and strict_minor is set",
    ):
        strict.decode(encoded.body, encoded.attributes)


@pytest.mark.parametrize("container_form", [False, True])
def test_strict_minor_decodes_the_minor_it_knows(strict: ProtobufValidator, container_form: bool) -> None:
    sent = user_created()
    encoded = strict.encode(sent, container=container_form)
    assert strict.decode(encoded.body, encoded.attributes) == sent


@pytest.mark.parametrize("strict_minor", [False, True])
def test_encoding_a_newer_minor_is_refused_either_way(strict_minor: bool) -> None:
    validator = ProtobufValidator([UserCreatedV1], strict_minor=strict_minor)
    assert validator.strict_minor is strict_minor
    with pytest.raises(ValidationError, match=r"minor version 1 is newer than the schema knows \(newest is 1\.0\)$"):
        validator.encode(dataclasses.replace(user_created(), version=Version(1, 1)))


def test_strict_minor_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        ProtobufValidator([UserCreatedV1], True)  # type: ignore[call-arg]


@pytest.mark.parametrize("container_form", [False, True])
def test_we_decode_authedwigs_newer_minor(validator: ProtobufValidator, container_form: bool) -> None:
    """authedwig's validator over the 1.3 class encodes; ours, whose class knows 1.0, decodes."""
    sent = dataclasses.replace(user_created(UserCreatedV1_3(user_id="U_1", nickname="Ada")), version=Version(1, 3))
    with authedwig_settings(
        HEDWIG_PROTOBUF_MESSAGES=[UserCreatedV1_3], HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES=not container_form
    ):
        from hedwig.validators.protobuf import ProtobufValidator as AuthedwigProtobufValidator

        body, attributes = AuthedwigProtobufValidator().serialize(authedwig_message(sent))
    got = validator.decode(body, attributes)
    assert (got.version, got.id, got.data.user_id) == (Version(1, 3), sent.id, "U_1")
    assert got.data.SerializeToString() == sent.data.SerializeToString()


@pytest.mark.parametrize("container_form", [False, True])
def test_decode_delivery_attaches_the_delivery_as_it_builds_the_message(
    validator: ProtobufValidator, container_form: bool
) -> None:
    message = user_created(request_id="req-42")
    encoded = validator.encode(message, container=container_form)
    delivery = Delivery(encoded.body, dict(encoded.attributes), attempt=2, receipt=None, subscription="s")
    got = validator.decode_delivery(encoded.body, encoded.attributes, delivery)
    assert got == message
    assert got.delivery is delivery and got.attempt == 2
    assert validator.decode(encoded.body, encoded.attributes).delivery is None
