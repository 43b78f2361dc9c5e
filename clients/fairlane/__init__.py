"""Fairlane: per-client FIFO request lanes over gRPC.

The names here are the public Python API: the handler API (`PermanentError`,
`HandlerContext`, `handler`) and, from `fairlane.client`, the client library.
"""

from fairlane.handlers import HandlerContext, PermanentError, handler

__all__ = ["HandlerContext", "PermanentError", "handler"]
__version__ = "0.1.0"
