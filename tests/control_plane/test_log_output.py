"""Batched log output (control_plane/cli/log_output.py)."""

from __future__ import annotations

import io
import re
import time
from datetime import UTC, datetime, timedelta

from control_plane.cli.log_output import MAX_BUFFERED, BufferedLogger, LineBuffer, UtcTimestamp


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


def test_timestamps_are_iso_utc_with_microseconds_and_follow_the_clock() -> None:
    stamp = UtcTimestamp()
    before = datetime.now(UTC)
    first = stamp(None, "info", {})["timestamp"]
    time.sleep(1.1)  # into another second: the cached date-time part must move on
    second = stamp(None, "info", {"event": "x"})["timestamp"]
    after = datetime.now(UTC)
    pattern = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
    assert pattern.fullmatch(first) and pattern.fullmatch(second), (first, second)
    t1, t2 = (datetime.fromisoformat(x.replace("Z", "+00:00")) for x in (first, second))
    assert before - timedelta(milliseconds=1) <= t1 < t2 <= after + timedelta(milliseconds=1)
    assert (t2 - t1) >= timedelta(seconds=1)


def test_warnings_and_errors_are_also_echoed() -> None:
    out, echo = io.StringIO(), io.StringIO()
    log = BufferedLogger(LineBuffer(out), echo)
    log.info("quiet")
    log.warning("look")
    log.error("broken")
    assert out.getvalue() == "quiet\nlook\nbroken\n"  # the file gets everything, in order
    assert echo.getvalue() == "look\nbroken\n"  # the terminal what a person must see
