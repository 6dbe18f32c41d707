"""Where structlog's lines go: stdout (or a log file), written in batches.

An API process logs a line per request; writing and flushing each one costs a system call per
request (a sixth of a cached read's CPU). Here info and debug lines are collected and written
together at most ``FLUSH_SECONDS`` later (by a small daemon thread, so nothing depends on an
event loop), while a warning or error flushes everything at once, in order. Lines still
buffered at interpreter exit are written by an ``atexit`` hook.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, Protocol, TextIO

FLUSH_SECONDS = 0.2
MAX_BUFFERED = 512  # lines: a burst beyond this is written at once


class LineBuffer:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream  # None: sys.stdout as it is at each write (tests swap it)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        atexit.register(self.flush)

    def add(self, line: str, *, urgent: bool = False) -> None:
        with self._lock:
            self._lines.append(line)
            full = len(self._lines) >= MAX_BUFFERED
        if urgent or full:
            self.flush()
        elif self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._flush_forever, name="log-flush", daemon=True)
            self._thread.start()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            if not lines:
                return
            stream = self._stream or sys.stdout
            try:
                stream.write("\n".join(lines) + "\n")
                stream.flush()
            except (OSError, ValueError):  # stdout closed (shutdown, a finished test's capture)
                pass

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush()


class Writable(Protocol):
    def write(self, text: str, /) -> object: ...
    def flush(self) -> object: ...


class CurrentStderr:
    """``sys.stderr`` as it is at each write: a live display (rich's progress and status
    lines) swaps it for a proxy that prints above the display."""

    def write(self, text: str, /) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class BufferedLogger:
    """A structlog logger writing rendered lines through a :class:`LineBuffer`; warnings and
    errors are also written to ``echo`` when given (``openloops up``: the log file gets every
    line, the terminal the ones a person must see)."""

    def __init__(self, buffer: LineBuffer, echo: Writable | None = None) -> None:
        self._buffer = buffer
        self._echo = echo

    def _later(self, message: str) -> None:
        self._buffer.add(message)

    def _now(self, message: str) -> None:
        self._buffer.add(message, urgent=True)
        if self._echo is not None:
            try:
                self._echo.write(message + "\n")
                self._echo.flush()
            except (OSError, ValueError):  # the terminal is gone
                pass

    debug = info = msg = log = _later
    warning = warn = error = err = critical = fatal = exception = failure = _now


class BufferedLoggerFactory:
    def __init__(self, stream: TextIO | None = None, *, echo: Writable | None = None) -> None:
        self.buffer = LineBuffer(stream)
        self._echo = echo

    def __call__(self, *_args: Any) -> BufferedLogger:
        return BufferedLogger(self.buffer, self._echo)


class UtcTimestamp:
    """structlog processor: ``timestamp`` in ISO 8601 UTC with microseconds, e.g.
    ``2026-11-24T00:53:58.392081Z`` (the format of structlog's ``TimeStamper(fmt="iso")``, at half its
    cost: the date and time of day are formatted once per second)."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")  # replaced whole: safe to share between threads

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = time.time()
        whole = int(now)
        second, text = self._second
        if whole != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._second = (whole, text)
        event_dict["timestamp"] = f"{text}.{int((now - whole) * 1_000_000):06d}Z"
        return event_dict
