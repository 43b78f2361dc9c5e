"""Python client for Fairlane: `Client` (asyncio) and `SyncClient` (blocking).

```python
from fairlane.client import Client

async with Client("127.0.0.1:50051", "127.0.0.1:50052") as client:
    await client.login("alice", "secret-password")
    async with client.session() as session:
        result = await (await session.submit("echo", b"hello"))
```

See docs/client.md.
"""

from fairlane.client.async_client import Client
from fairlane.client.errors import (
    AlreadyExists,
    ClientClosed,
    DeadlineExceeded,
    FailedPrecondition,
    FairlaneError,
    InvalidArgument,
    NotFound,
    NotLoggedIn,
    OutcomeUnknown,
    PermissionDenied,
    Rejected,
    RequestFailed,
    ResourceExhausted,
    SessionClosed,
    Unauthenticated,
    Unavailable,
)
from fairlane.client.retry import RetryPolicy
from fairlane.client.session import Session, SubmitFuture
from fairlane.client.sync import SyncClient
from fairlane.client.types import (
    Accepted,
    Enqueued,
    Event,
    HandlerInfo,
    HandlerStats,
    Identity,
    Lane,
    Progress,
    RejectedEvent,
    Request,
    Result,
    Status,
    Tokens,
    WorkerState,
    WorkerStatus,
)

__all__ = [
    "Accepted",
    "AlreadyExists",
    "Client",
    "ClientClosed",
    "DeadlineExceeded",
    "Enqueued",
    "Event",
    "FailedPrecondition",
    "FairlaneError",
    "HandlerInfo",
    "HandlerStats",
    "Identity",
    "InvalidArgument",
    "Lane",
    "NotFound",
    "NotLoggedIn",
    "OutcomeUnknown",
    "PermissionDenied",
    "Progress",
    "Rejected",
    "RejectedEvent",
    "Request",
    "RequestFailed",
    "ResourceExhausted",
    "Result",
    "RetryPolicy",
    "Session",
    "SessionClosed",
    "Status",
    "SubmitFuture",
    "SyncClient",
    "Tokens",
    "Unauthenticated",
    "Unavailable",
    "WorkerState",
    "WorkerStatus",
]
