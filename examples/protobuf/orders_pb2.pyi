from hedwig_tasks.validators import protobuf_options_pb2 as _protobuf_options_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class OrderPlacedV1(_message.Message):
    __slots__ = ("order_id", "total_cents", "skus", "coupon")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CENTS_FIELD_NUMBER: _ClassVar[int]
    SKUS_FIELD_NUMBER: _ClassVar[int]
    COUPON_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    total_cents: int
    skus: _containers.RepeatedScalarFieldContainer[str]
    coupon: str
    def __init__(self, order_id: _Optional[str] = ..., total_cents: _Optional[int] = ..., skus: _Optional[_Iterable[str]] = ..., coupon: _Optional[str] = ...) -> None: ...

class ShipOrderV1(_message.Message):
    __slots__ = ("order_id", "address")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    address: str
    def __init__(self, order_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...
