"""Request ids: one per HTTP request, sent back in `x-request-id` and carried by every log line
about that request.

The id lives in a context variable, set by the observability middleware (server.observability.metrics) for the
request's task; tasks the request starts copy it, so lines logged on the event loop carry it
without being passed it. The model thread has no request context: the serving layer hands the id
to the engine with a request's jobs, and the engine passes it to its log calls as
`extra={"request_id": ...}`.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar, Token

HEADER = "x-request-id"
MAX_LENGTH = 128
NO_REQUEST = "-"  # what lines logged outside any request show

# Visible ASCII, no spaces or control characters: an id a client sends is written into log lines
# and a response header as it is, so it must not be able to forge a line or a header.
_SANE = re.compile(rb"[!-~]{1,%d}" % MAX_LENGTH)

_current: ContextVar[str] = ContextVar("request_id", default=NO_REQUEST)


def current_request_id() -> str:
    """The id of the request being served in this context, or "-"."""
    return _current.get()


def choose_request_id(sent: bytes | None) -> str:
    """The client's id if it is sane (1..128 visible ASCII characters), else a new one."""
    if sent is not None and _SANE.fullmatch(sent):
        return sent.decode("ascii")
    return uuid.uuid4().hex


def set_request_id(request_id: str) -> Token[str]:
    """Make `request_id` current; returns the token to reset it with."""
    return _current.set(request_id)


def reset_request_id(token: Token[str]) -> None:
    _current.reset(token)


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` attribute (for a format's %(request_id)s): the one passed
    in `extra`, else the current request's, else "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _current.get()
        return True


def add_request_id_filter(handler: logging.Handler) -> None:
    if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
        handler.addFilter(RequestIdFilter())


# uvicorn's default access line, and the same with the request id.
_UVICORN_ACCESS = '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
_UVICORN_ACCESS_WITH_ID = '%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" %(status_code)s'


def install_request_id_logging() -> None:
    """Give the root logger's handlers (whose format shows %(request_id)s) and uvicorn's access
    log the request id; uvicorn's access line shows it when it has uvicorn's default format (a
    user's --log-config is left as it is, with %(request_id)s available to it)."""
    for handler in logging.getLogger().handlers:
        add_request_id_filter(handler)
    for handler in logging.getLogger("uvicorn.access").handlers:
        add_request_id_filter(handler)
        formatter = handler.formatter
        if formatter is not None and getattr(formatter, "_fmt", None) == _UVICORN_ACCESS:
            from uvicorn.logging import AccessFormatter

            colors = getattr(formatter, "use_colors", None)
            handler.setFormatter(AccessFormatter(_UVICORN_ACCESS_WITH_ID, use_colors=colors))
