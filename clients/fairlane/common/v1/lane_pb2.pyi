import datetime

from fairlane.common.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LaneItem(_message.Message):
    __slots__ = ("request_id", "handler", "payload", "max_attempts", "deadline", "client_ref", "traceparent")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDLER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REF_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    handler: str
    payload: bytes
    max_attempts: int
    deadline: _timestamp_pb2.Timestamp
    client_ref: str
    traceparent: str
    def __init__(self, request_id: _Optional[str] = ..., handler: _Optional[str] = ..., payload: _Optional[bytes] = ..., max_attempts: _Optional[int] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., client_ref: _Optional[str] = ..., traceparent: _Optional[str] = ...) -> None: ...

class LaneBatch(_message.Message):
    __slots__ = ("user_id", "reply_route", "items")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_ROUTE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    reply_route: str
    items: _containers.RepeatedCompositeFieldContainer[LaneItem]
    def __init__(self, user_id: _Optional[str] = ..., reply_route: _Optional[str] = ..., items: _Optional[_Iterable[_Union[LaneItem, _Mapping]]] = ...) -> None: ...

class LaneEvent(_message.Message):
    __slots__ = ("user_id", "result", "progress")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    result: _common_pb2.Result
    progress: _common_pb2.Progress
    def __init__(self, user_id: _Optional[str] = ..., result: _Optional[_Union[_common_pb2.Result, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ...) -> None: ...

class LaneEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[LaneEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[LaneEvent, _Mapping]]] = ...) -> None: ...

class ControlEvent(_message.Message):
    __slots__ = ("lane_created", "lane_deleted")
    LANE_CREATED_FIELD_NUMBER: _ClassVar[int]
    LANE_DELETED_FIELD_NUMBER: _ClassVar[int]
    lane_created: str
    lane_deleted: str
    def __init__(self, lane_created: _Optional[str] = ..., lane_deleted: _Optional[str] = ...) -> None: ...
