"""structlog configuration: JSON lines in services, a console renderer for `fairlane dev`."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace


def _add_trace_ids(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event["trace_id"] = format(ctx.trace_id, "032x")
        event["span_id"] = format(ctx.span_id, "016x")
    return event


LIBRARY_LOGGERS = ("aiormq", "aio_pika", "grpc", "sqlalchemy", "asyncio", "alembic")


class _ReturnedMessageFilter(logging.Filter):
    """aiormq logs a message RabbitMQ returned (mandatory, unroutable) that it cannot match
    to a publish as an error with the whole message, body included: a user's payload in
    the log. Those are returns of publishes the broker code gave up on after a timeout
    (`AmqpBroker._basic_publish` forgets them on purpose); they go out as a warning with
    the exchange and routing key only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Unhandled message %r returning" and isinstance(record.args, tuple):
            delivery = getattr(record.args[0] if record.args else None, "delivery", None)
            record.msg = "returned message of a publish given up on: exchange %r, routing key %r"
            record.args = (getattr(delivery, "exchange", ""), getattr(delivery, "routing_key", ""))
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure(service: str, *, json: bool = True, level: str = "INFO") -> None:
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_ids,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # Libraries (aiormq, aio_pika, grpc, sqlalchemy, ...) log through stdlib logging: their
    # records go out as the same lines (JSON in services), with the logger's name. Keep
    # their warnings, drop their chatter.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _add_trace_ids,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    channel_log = logging.getLogger("aiormq.channel")
    if not any(isinstance(f, _ReturnedMessageFilter) for f in channel_log.filters):
        channel_log.addFilter(_ReturnedMessageFilter())


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
