"""Batched log output (control_plane/log_output.py)."""

from __future__ import annotations

import io
import time

from control_plane.log_output import MAX_BUFFERED, BufferedLogger, LineBuffer


def test_info_lines_are_batched_and_warnings_flush_everything_in_order() -> None:
    out = io.StringIO()
    log = BufferedLogger(LineBuffer(out))
    log.info("a")
    log.info("b")
    assert out.getvalue() == ""  # not yet: written together
    deadline = time.monotonic() + 2
    while out.getvalue() != "a\nb\n":
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.02)
    log.info("c")
    log.warning("d")  # at once, after what came before it
    assert out.getvalue() == "a\nb\nc\nd\n"


def test_a_burst_is_written_when_the_buffer_fills() -> None:
    out = io.StringIO()
    log = BufferedLogger(LineBuffer(out))
    for i in range(MAX_BUFFERED):
        log.info(str(i))
    assert out.getvalue().splitlines() == [str(i) for i in range(MAX_BUFFERED)]


def test_a_closed_stream_does_not_break_the_caller() -> None:
    out = io.StringIO()
    buf = LineBuffer(out)
    out.close()
    BufferedLogger(buf).error("lost")  # no exception
    buf.flush()
