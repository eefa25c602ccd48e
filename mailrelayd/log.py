"""Structured logging: one JSON object per line on stdout (journald keeps it), or console text.

Secrets never reach the log: keys that name secrets are redacted by a processor, and the
libraries that log protocol lines (aiosmtpd logs every command, AUTH payloads included, at INFO)
are capped at WARNING.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
import time
from typing import Any, TextIO

import structlog
from aiohttp.http import HttpProcessingError  # (listed in aiohttp.http.__all__)

# Keys whose values are never logged, whatever the caller passes.
_SECRET_KEYS = frozenset({
    "password", "passwd", "secret", "auth_data", "auth_payload", "login_data", "private_key",
    "key_pem", "verp_secret", "token", "credentials", "authorization",
})
REDACTED = "[redacted]"

# Libraries that would log protocol traffic or noisy tracebacks on their own.
_QUIET_LOGGERS = {"mail.log": logging.WARNING, "asyncio": logging.WARNING,
                  "aiohttp.access": logging.WARNING}


class ClientFaults(logging.Filter):
    """For aiohttp's documented ``aiohttp.server`` logger: a request its parser refuses (a head over 8 KB,
    two Content-Types, Content-Length with Transfer-Encoding, no Host, a bad chunk) or a client gone in the
    middle of one is logged by aiohttp at ERROR with a traceback. Anyone who can connect to the API or the
    sidecar could fill the error log and page someone with those. They become one INFO line (DEBUG for a
    client gone) naming the exception type only: its text quotes the request's bytes, an Authorization
    header among them. Any other exception (a fault of ours) stays an ERROR with its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            level = logging.INFO
        elif isinstance(exc, ConnectionError):
            level = logging.DEBUG
        else:
            return True
        if not logging.getLogger(record.name).isEnabledFor(level):
            return False
        record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}", ()
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.exc_info = record.exc_text = None
        return True


_CLIENT_FAULTS = ClientFaults()


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for k in event.keys() & _SECRET_KEYS:
        event[k] = REDACTED
    return event


class LineBatcher:
    """A file-like front for the log stream that writes at most once per ``delay``.

    structlog's PrintLogger and logging's StreamHandler write and flush every line: one syscall
    each, four or five per message at load (about a tenth of the daemon's CPU). Lines written
    from the loop's thread are joined and written, in order, by one timer ``delay`` after the first
    of them, or at once when ``max_bytes`` have gathered; from any other thread, or with no loop
    running, at once. A kill -9 loses at most the lines of the last ``delay``; an orderly exit
    writes them (the daemon calls :meth:`flush_now` last). Once per loop turn instead of per 10 ms
    cost about 5% of the accept rate (bench/ab.py; bench/README.md, fifth session)."""

    def __init__(self, stream: TextIO, *, delay: float = 0.01, max_bytes: int = 64 * 1024) -> None:
        self.stream = stream
        self.delay = delay
        self.max_bytes = max_bytes
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._scheduled = False

    def write(self, text: str) -> int:
        with self._lock:
            self._lines.append(text)
            self._size += len(text)
        return len(text)

    def flush(self) -> None:
        if self._size >= self.max_bytes:
            self.flush_now()
            return
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush_now()
            return
        self._scheduled = True
        loop.call_later(self.delay, self._on_timer)

    def _on_timer(self) -> None:
        self._scheduled = False
        self.flush_now()

    def flush_now(self) -> None:
        with self._lock:
            if not self._lines:
                return
            text = "".join(self._lines)
            self._lines.clear()
            self._size = 0
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # stdout gone (closed pipe, closed file): nowhere to say so
                pass

    def isatty(self) -> bool:
        return self.stream.isatty()


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "exception": logging.ERROR,
           "critical": logging.CRITICAL, "fatal": logging.CRITICAL}


class _Output:
    """structlog's logger (what the bound loggers write to) and the settings that a reload may
    change: the minimum level, the renderer, the stream.

    Loggers are cached on first use (building one per call cost about a third of each log line),
    so a later :func:`configure_logging` cannot replace what they hold; it updates this object,
    which every cached logger reads on each event."""

    def __init__(self, stream: TextIO | LineBatcher, level: int, renderer: Any) -> None:
        self.stream = stream
        self.level = level
        self.renderer = renderer

    def __call__(self, *args: Any) -> _Output:  # structlog's logger_factory
        return self

    def drop_below_level(self, _: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if _LEVELS.get(method, logging.INFO) < self.level:
            raise structlog.DropEvent
        return event

    def render(self, logger: Any, method: str, event: dict[str, Any]) -> Any:
        return self.renderer(logger, method, event)

    def msg(self, message: str) -> None:
        self.stream.write(message + "\n")
        self.stream.flush()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def _timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """``ts`` as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it, for a fraction of its cost."""
    now = time.time()
    second = int(now)
    event["ts"] = f"{_iso_second(second)}.{int((now - second) * 1_000_000):06d}Z"
    return event


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | LineBatcher | None = None) -> None:
    """Set up structlog (and route stdlib ``logging`` through the same renderer). The daemon passes
    a :class:`LineBatcher` (one write per event-loop turn). May be called again (reload): loggers
    already in use follow the new level, format and stream."""
    stream = stream or sys.stdout
    lvl = getattr(logging, level.upper())
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(default=str)
    out = structlog.get_config()["logger_factory"]
    if isinstance(out, _Output):
        out.stream, out.level, out.renderer = stream, lvl, renderer
    else:
        out = _Output(stream, lvl, renderer)
        shared: list[Any] = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                             _timestamp, _redact]
        structlog.configure(
            processors=[out.drop_below_level, *shared, structlog.processors.format_exc_info, out.render],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            logger_factory=out,
            cache_logger_on_first_use=True,
        )
    # stdlib logging (asyncio, aiohttp, aiosmtpd warnings) goes through the same pipeline.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.contextvars.merge_contextvars,
                           structlog.processors.add_log_level, _timestamp, _redact],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    for name, minimum in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(minimum, lvl))
    logging.getLogger("aiohttp.server").addFilter(_CLIENT_FAULTS)  # (adding it again is a no-op)


def get_logger(**context: Any) -> Any:
    """A structlog logger with ``context``; lazy, so module-level loggers follow configure_logging()."""
    return structlog.get_logger(**context)
