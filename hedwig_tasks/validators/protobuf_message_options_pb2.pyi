from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageOptions(_message.Message):
    __slots__ = ("major_version", "minor_version", "message_type")
    MAJOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    MINOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    major_version: int
    minor_version: int
    message_type: str
    def __init__(self, major_version: _Optional[int] = ..., minor_version: _Optional[int] = ..., message_type: _Optional[str] = ...) -> None: ...

class MessageOptionsCarrier(_message.Message):
    __slots__ = ("message_options",)
    MESSAGE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    message_options: MessageOptions
    def __init__(self, message_options: _Optional[_Union[MessageOptions, _Mapping]] = ...) -> None: ...
