"""Fairlane: per-client FIFO request lanes over gRPC.

The names here are the public Python API: the handler API (`PermanentError`,
`HandlerContext`, `handler`) and, from `fairlane.client`, the client library.
"""

from fairlane.handlers import HandlerContext, Hooks, PermanentError, PlainContext, handler

__all__ = ["HandlerContext", "Hooks", "PermanentError", "PlainContext", "handler"]
__version__ = "0.1.0"
