"""Text of an exception for logs and error messages."""

from __future__ import annotations


def describe_error(exc: BaseException) -> str:
    """str(exc), or the exception's type name when that is empty: TimeoutError(),
    CancelledError() and a bare Exception() have no text, and were logged as `"error": ""`
    or "publish to lane failed: " with nothing after it."""
    return str(exc) or type(exc).__name__
