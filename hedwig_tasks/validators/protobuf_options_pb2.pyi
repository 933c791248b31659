from google.protobuf import descriptor_pb2 as _descriptor_pb2
from hedwig_tasks.validators import protobuf_message_options_pb2 as _protobuf_message_options_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
MESSAGE_OPTIONS_FIELD_NUMBER: _ClassVar[int]
message_options: _descriptor.FieldDescriptor
