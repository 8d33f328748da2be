"""Logs: text for people, JSON lines for machines (`--log-format json|text`), with the call's request id.

The request id of a call is the client's `x-request-id` metadata when set, else `ExplainRequest.request_id`
when set, else the server's job id: metadata wins because proxies and tracing set it for every RPC, the field
is the in-message fallback for clients that cannot set metadata. It is echoed in `Accepted.request_id` and in
the `x-request-id` trailing metadata, and every log line written while the call runs carries it.

No secrets in logs: the server never logs metadata or request bodies, and the JSON formatter drops any extra
field whose name looks like a credential.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("onnxplain_request_id", default="")
_ALLOWED = re.compile(r"[^A-Za-z0-9._:/+=@-]")
_SECRET = re.compile(r"token|authorization|password|secret|credential|key", re.IGNORECASE)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


STATUS_DETAIL_CHARS = 1024


def status_detail(message: str) -> str:
    """A status message short enough for gRPC's metadata limit: messages quote the client's own values (a model or
    layer name, a path), and a 20,000-character one made the status itself fail in transport (the client saw
    RESOURCE_EXHAUSTED 'received metadata size exceeds hard limit' instead of the real code). Percent-encoding
    makes a character up to 12 bytes, so 1024 characters stay under 16 kB."""
    if len(message) <= STATUS_DETAIL_CHARS:
        return message
    return f"{message[:STATUS_DETAIL_CHARS - 40]}... ({len(message)} characters, cut)"


def clean_request_id(value: str) -> str:
    """A client-supplied id made safe to log and echo: at most 128 characters of [A-Za-z0-9._:/+=@-]."""
    return _ALLOWED.sub("_", value[:128])


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, the record's extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and not _SECRET.search(key):
                entry[key] = value if isinstance(value, (int, float, bool, str, type(None))) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once for the server process."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
