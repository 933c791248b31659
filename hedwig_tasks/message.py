"""Messages as frozen values: :class:`Version`, :class:`Metadata` and :class:`Message`."""

from __future__ import annotations

import builtins
import dataclasses
import re
import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

__all__ = ["Message", "Metadata", "Version", "VersionLike"]

_M = TypeVar("_M", bound="Message")
_T = TypeVar("_T")

_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)\s*$")
_PARSED: dict[str, Version] = {}  # versions seen, by their text: a service meets only a few
_PARSED_LIMIT = 1024

#: What a version may be given as: ``"1.0"``, ``(1, 0)``, a :class:`Version`, or any object
#: whose ``str()`` is ``"1.0"`` (such as the seed's ``StrictVersion("1.0")``).
VersionLike = Any


@dataclasses.dataclass(frozen=True, order=True)
class Version:
    """A schema version, ``major.minor``. Majors break compatibility; minors only add."""

    major: int
    minor: int

    def __post_init__(self) -> None:
        if self.major < 0 or self.minor < 0:
            raise ValueError(f"version numbers must be >= 0, got {self.major}.{self.minor}")

    @classmethod
    def parse(cls, value: VersionLike) -> Version:
        """Read ``"1.0"``, ``(1, 0)``, a Version, or anything whose ``str()`` is ``"1.0"``.

        Raises ``ValueError`` for anything else (``"1"``, ``"1.0.2"``, ``"v1"``).
        """
        if isinstance(value, Version):
            return value
        if isinstance(value, str):
            known = _PARSED.get(value)
            if known is not None:
                return known
        if isinstance(value, tuple) and len(value) == 2:
            major, minor = value
            if isinstance(major, int) and isinstance(minor, int):
                return cls(major, minor)
            raise ValueError(f"invalid version {value!r}: expected two integers")
        match = _VERSION_RE.match(str(value))
        if match is None:
            raise ValueError(f"invalid version {value!r}: expected 'MAJOR.MINOR', such as '1.0'")
        version = cls(int(match.group(1)), int(match.group(2)))
        if isinstance(value, str) and len(_PARSED) < _PARSED_LIMIT:
            _PARSED[value] = version
        return version

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _freeze(headers: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(headers or {}))


@dataclasses.dataclass(frozen=True)
class Metadata:
    """What travels beside the data: creation time, publisher, headers.

    ``delivery`` is set only on received messages: the transport's
    :class:`~hedwig_tasks.transports.base.Delivery` (attempt number, receipt, subscription).
    """

    timestamp: int = dataclasses.field(default_factory=_now_ms)  #: epoch milliseconds
    publisher: str = ""
    headers: Mapping[str, str] = dataclasses.field(default_factory=lambda: _freeze(None))
    delivery: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.headers, MappingProxyType):
            object.__setattr__(self, "headers", _freeze(self.headers))

    @classmethod
    def received(cls, timestamp: int, publisher: str, headers: dict[str, str], delivery: Any = None) -> Metadata:
        """Metadata read off the wire by a validator, which has checked the fields' types.

        ``headers`` must be a fresh dict: it is frozen as it is, not copied. A worker builds one
        per message, and a frozen dataclass's ``__init__`` costs several times this.
        """
        metadata = object.__new__(cls)
        metadata.__dict__.update(
            timestamp=timestamp, publisher=publisher, headers=MappingProxyType(headers), delivery=delivery
        )
        return metadata


@dataclasses.dataclass(frozen=True)
class Message:
    """One Hedwig message: a type, a schema version, its data and its metadata."""

    type: str
    version: Version
    data: Any
    id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    metadata: Metadata = dataclasses.field(default_factory=Metadata)

    def __post_init__(self) -> None:
        if not isinstance(self.version, Version):
            object.__setattr__(self, "version", Version.parse(self.version))

    @classmethod
    def new(
        cls: builtins.type[_M],
        type: str,
        version: VersionLike,
        data: Any,
        headers: Mapping[str, str] | None = None,
        *,
        id: str | None = None,
        publisher: str = "",
        timestamp: int | None = None,
    ) -> _M:
        """Build a new message (of this class) with a fresh id and the current time.

        Raises ``TypeError`` for a type that is not a string and ``ValueError`` for a bad version.
        """
        type = getattr(type, "value", type)  # an Enum member stands for its value
        if not isinstance(type, str) or not type:
            raise TypeError(f"message type must be a non-empty string, got {type!r}")
        metadata = Metadata(
            timestamp=_now_ms() if timestamp is None else timestamp,
            publisher=publisher,
            headers=_freeze(headers),
        )
        return cls(
            type=type,
            version=Version.parse(version),
            data=data,
            id=id or str(uuid.uuid4()),
            metadata=metadata,
        )

    @classmethod
    def received(cls, type: str, version: Version, data: Any, id: str, metadata: Metadata) -> Message:
        """A message read off the wire by a validator, which has checked every field.

        What ``Message(...)`` builds, without its checks: a worker builds one per message, and a
        frozen dataclass's ``__init__`` costs several times this.
        """
        message = object.__new__(cls)
        message.__dict__.update(type=type, version=version, data=data, id=id, metadata=metadata)
        return message

    @property
    def major_version(self) -> int:
        return self.version.major

    @property
    def minor_version(self) -> int:
        return self.version.minor

    @property
    def headers(self) -> Mapping[str, str]:
        return self.metadata.headers

    @property
    def timestamp(self) -> int:
        return self.metadata.timestamp

    @property
    def publisher(self) -> str:
        return self.metadata.publisher

    @property
    def delivery(self) -> Any:
        """The transport delivery this message came in, or None for one built locally."""
        return self.metadata.delivery

    @property
    def attempt(self) -> int:
        """Which delivery of this message this is: 1 the first time, 2 on the first retry, ...

        Right in every mode: a worker reads it from the transport's delivery count, an eager run
        and a message built locally (never delivered) say 1.
        """
        delivery = self.metadata.delivery
        return delivery.attempt if delivery is not None else 1

    def with_headers(self, headers: Mapping[str, str]) -> Message:
        """A copy whose headers are these merged over the current ones."""
        return self.with_metadata(headers={**self.headers, **headers})

    def with_metadata(self, **changes: Any) -> Message:
        """A copy with these metadata fields replaced (``publisher``, ``timestamp``, ``headers``, ``delivery``).

        Raises ``TypeError`` for a field Metadata does not have.
        """
        unknown = changes.keys() - _METADATA_FIELDS
        if unknown:
            raise TypeError(f"Metadata has no field(s) {', '.join(sorted(unknown))}")
        if "headers" in changes:
            changes["headers"] = _freeze(changes["headers"])
        # Copied field by field: the values are already checked, and a worker does this per message.
        return _copy(self, metadata=_copy(self.metadata, **changes))


def delivered(message: _M, delivery: Any) -> _M:
    """A copy of a message a validator just read, carrying the delivery it came in.

    What ``message.with_metadata(delivery=delivery)`` gives, without its checks: a worker
    does this per message.
    """
    return _copy(message, metadata=_copy(message.metadata, delivery=delivery))


_METADATA_FIELDS = frozenset(f.name for f in dataclasses.fields(Metadata))


def _copy(value: _T, **changes: Any) -> _T:
    """A copy of a frozen dataclass value with ``changes``, without running its checks again."""
    copy = object.__new__(type(value))
    copy.__dict__.update(value.__dict__)
    copy.__dict__.update(changes)
    return copy
