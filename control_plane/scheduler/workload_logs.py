"""A workload's own log lines: parsing and filtering, shared by the scheduler backends.

Pure functions plus a reader of local log files; no ``kubernetes`` import.

A physical line is one of:

* a Python logging record of the trainer worker, ``"%(asctime)s %(levelname)s %(name)s:
  %(message)s"`` (``2026-12-06 10:12:17,123 INFO openloops.worker: step 3``, local time);
* a vLLM record, ``INFO 12-06 10:12:17 [file.py:12] message``, optionally after a process
  prefix such as ``(EngineCore pid=123)`` (local time, no year: the year is the one that puts
  the line at or before the source's last write, allowing a day of clock skew);
* a line with a level but no time (uvicorn's ``INFO:     127.0.0.1 - "GET /health" 200``): its
  own level, the previous record's time;
* anything else (a traceback line, print output) is a *continuation*: it belongs to the
  record before it and takes its time, level and request id.

The message of a record is the line without its time and level (the logger name, vLLM's
``[file.py:12]`` and process prefix stay). Lines before the first record of a source have no
record to belong to: see :func:`read_log_file` and :func:`parse_kubelet_log` for their time;
their level is INFO. A request id is taken from ``request_id=<id>`` or ``(request <id>)``.
Blank lines are dropped.

Filtering by ``[start_ns, end_ns]`` and ``min_level``, the direction and the limit apply to the
parsed lines.
"""

from __future__ import annotations

import calendar
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from control_plane.scheduler.protocol import LOG_LEVELS, LogLine, LogQuery

LEVEL_RANK = {name: i for i, name in enumerate(LOG_LEVELS)}
_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}
_LEVEL = r"DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL"
_PREFIX = r"(\([^()\n]{1,80}\)\s+)?"  # vLLM's "(EngineCore_DP0 pid=123) "

_PY_RECORD = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:[,.](\d{1,6}))?\s+(" + _LEVEL + r")\s+(.*)", re.DOTALL
)
_VLLM_RECORD = re.compile(
    _PREFIX + r"(" + _LEVEL + r")\s+(\d\d)-(\d\d)\s+(\d\d):(\d\d):(\d\d)(?:[,.](\d{1,6}))?\s+(.*)", re.DOTALL
)
_LEVEL_ONLY = re.compile(_PREFIX + r"(" + _LEVEL + r"):\s")
_REQUEST_ID = re.compile(r"request_id\s*=\s*[\"']?([\w.:/-]+)|\(request ([\w.:/-]+)\)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

DAY_NS = 86_400 * 10**9
# log records of different processes interleave in one file: times may go back a little
ORDER_SLACK_NS = 2 * 10**9


class ParsedLine(NamedTuple):
    timestamp_ns: int | None  # None: not a record (a continuation, or a level-only line)
    level: str | None  # None: a continuation
    message: str
    request_id: str | None


def level_at_least(level: str, min_level: str) -> bool:
    return LEVEL_RANK.get(level, 1) >= LEVEL_RANK.get(min_level, 0)


def request_id_of(text: str) -> str | None:
    m = _REQUEST_ID.search(text)
    if m is None:
        return None
    rid = (m.group(1) or m.group(2) or "").rstrip(".:,;/")
    return rid or None


def _local_ns(y: int, mo: int, d: int, h: int, mi: int, s: int, frac: str | None) -> int | None:
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 61):
        return None
    try:
        secs = time.mktime((y, mo, d, h, mi, s, 0, 0, -1))
    except (OverflowError, ValueError):
        return None
    micros = int((frac or "0").ljust(6, "0")[:6])
    return int(secs) * 10**9 + micros * 1000


def parse_line(text: str, reference_ns: int | None = None) -> ParsedLine:
    """Parse one physical line (without its newline). ``reference_ns``: a time at or after the
    line was written (the file's last write, now), used to find the year of vLLM records."""
    text = _ANSI.sub("", text.rstrip("\r\n")) if "\x1b" in text else text.rstrip("\r\n")
    rid = request_id_of(text) if "request" in text else None
    head = text[:1]
    if head.isdigit():
        m = _PY_RECORD.match(text)
        if m is not None:
            y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
            ts = _local_ns(y, mo, d, h, mi, s, m.group(7))
            if ts is not None:
                return ParsedLine(ts, _ALIASES.get(m.group(8), m.group(8)), m.group(9), rid)
    elif head in "(DIWECF":
        m = _VLLM_RECORD.match(text)
        if m is not None:
            ts = _vllm_ns(m, reference_ns)
            if ts is not None:
                level = _ALIASES.get(m.group(2), m.group(2))
                return ParsedLine(ts, level, (m.group(1) or "") + m.group(9), rid)
        m = _LEVEL_ONLY.match(text)
        if m is not None:
            return ParsedLine(None, _ALIASES.get(m.group(2), m.group(2)), text, rid)
    return ParsedLine(None, None, text, rid)


def _vllm_ns(m: re.Match[str], reference_ns: int | None) -> int | None:
    ref = reference_ns if reference_ns is not None else time.time_ns()
    year = time.localtime(ref / 1e9).tm_year
    mo, d, h, mi, s = (int(m.group(i)) for i in range(3, 8))
    ts = _local_ns(year, mo, d, h, mi, s, m.group(8))
    if ts is not None and ts > ref + DAY_NS:  # e.g. a December line read in January
        ts = _local_ns(year - 1, mo, d, h, mi, s, m.group(8))
    return ts


def in_query(line: LogLine, query: LogQuery) -> bool:
    return query.start_ns <= line.timestamp_ns <= query.end_ns and level_at_least(line.level, query.min_level)


def select(lines: list[LogLine], query: LogQuery) -> list[LogLine]:
    """Merge lines of any number of sources (each oldest first): the ``limit`` matching ones in
    the query's direction. Lines with one time keep their order (reversed for ``desc``)."""
    ordered = sorted((x for x in lines if in_query(x, query)), key=lambda x: x.timestamp_ns)
    if query.direction == "desc":
        return ordered[::-1][: query.limit]
    return ordered[: query.limit]


# --- Kubernetes: the text of a pod log read with timestamps=true ---------------------------------


_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def parse_rfc3339_ns(value: str) -> int | None:
    """``2026-12-06T10:12:17.123456789Z`` (any number of fraction digits, ``Z`` or an offset)
    to Unix nanoseconds."""
    m = _RFC3339.fullmatch(value)
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    try:
        secs = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))
    except (OverflowError, ValueError):
        return None
    tz = m.group(8)
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        secs -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return secs * 10**9 + int((m.group(7) or "0").ljust(9, "0"))


class KubeletLog(NamedTuple):
    lines: list[LogLine]  # every parsed line, in the log's order (not filtered)
    raw_lines: int  # physical lines in the text (a cut last line excluded)
    first_record: int  # index in ``lines`` of the first record: those before it had theirs cut off


def parse_kubelet_log(text: str, replica: str, *, truncated_end: bool = False) -> KubeletLog:
    """Parse what ``read_namespaced_pod_log(timestamps=True)`` returns. Every line's time is
    the kubelet's prefix (UTC, nanoseconds, the clock ``sinceSeconds`` filters on; the
    application's own time is local to the container and second-precise for vLLM); level and
    request id come from the line, continuations take those of the record before them.
    ``truncated_end``: the text was cut by ``limitBytes``, so its last line may be partial."""
    physical = text.split("\n")
    if physical and (physical[-1] == "" or truncated_end):  # after the last newline / a cut line
        physical.pop()
    out: list[LogLine] = []
    level, rid, first_record = "INFO", None, None
    last_ts = 0
    for raw in physical:
        stamp, _, rest = raw.partition(" ")
        ts = parse_rfc3339_ns(stamp)
        if ts is None:  # no prefix (not expected with timestamps=true): the previous line's time
            ts, rest = last_ts, raw
        last_ts = ts
        if not rest.strip():
            continue
        p = parse_line(rest, ts)
        if p.timestamp_ns is not None:
            level, rid = p.level or "INFO", p.request_id
            if first_record is None:
                first_record = len(out)
            out.append(LogLine(ts, p.message, replica, level, p.request_id))
        else:
            out.append(LogLine(ts, p.message, replica, p.level or level, p.request_id or rid))
    return KubeletLog(out, len(physical), len(out) if first_record is None else first_record)


# --- local log files -----------------------------------------------------------------------------

_CHUNK = 64 * 1024
_MAX_PROBE = 1024 * 1024  # bytes a bisection probe reads looking for a record


def _source_start_ns(st: os.stat_result) -> int:
    """The earliest time the file's first lines can be given: its creation time where the
    platform records one, else its ctime (on Linux the last status change, i.e. an upper bound)."""
    birth_s = getattr(st, "st_birthtime", None)
    birth = getattr(st, "st_birthtime_ns", None) or (int(birth_s * 1e9) if birth_s else None)
    return int(birth) if birth else int(st.st_ctime_ns)


def _forward_lines(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line without newline) from ``start`` (a line start) up to ``end``."""
    f.seek(start)
    off = start
    while off < end:
        raw = f.readline(end - off)
        if not raw:
            return
        yield off, raw.rstrip(b"\n")
        off += len(raw)


def _reverse_lines(f: BinaryIO, end: int, stop: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, line) from the last line before ``end`` back to ``stop`` (a line start)."""
    pos, tail = end, b""
    while pos > stop:
        size = min(_CHUNK, pos - stop)
        pos -= size
        f.seek(pos)
        buf = f.read(size) + tail
        parts = buf.split(b"\n")
        tail = parts[0]  # may continue in the previous chunk
        off = pos + len(buf)
        for part in reversed(parts[1:]):
            off -= len(part) + 1
            if part or off + 1 < end:  # not the empty piece after a final newline
                yield off + 1, part
    if tail:
        yield stop, tail


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _record_at_or_after(f: BinaryIO, off: int, end: int, ref_ns: int) -> tuple[int, int] | None:
    """(offset, time) of the first record that starts at or after ``off``."""
    if off > 0:
        f.seek(off - 1)
        if f.read(1) != b"\n":  # inside a line: skip to the next one
            f.readline()
        off = f.tell()
    limit = min(end, off + _MAX_PROBE)
    for line_off, raw in _forward_lines(f, off, limit):
        p = parse_line(_decode(raw), ref_ns)
        if p.timestamp_ns is not None:
            return line_off, p.timestamp_ns
    return None


def _bisect(f: BinaryIO, size: int, target_ns: int, ref_ns: int) -> int:
    """A line start from which every record that matters for ``>= target_ns`` follows: the
    offset of a record older than ``target_ns`` (or 0), close to the first one that is not."""
    lo, hi = 0, size
    while hi - lo > _CHUNK:
        mid = (lo + hi) // 2
        found = _record_at_or_after(f, mid, hi, ref_ns)
        if found is None or found[0] >= hi:
            hi = mid
        elif found[1] < target_ns:
            lo = found[0]
        else:
            hi = mid
    return lo


def read_log_file(path: Path, query: LogQuery, replica: str) -> list[LogLine]:
    """The lines of one local log file matching ``query``, in its direction.

    ``asc`` bisects the file to the first record at ``start_ns`` (minus a little slack: records
    of concurrent processes interleave) and reads forward until past ``end_ns``; ``desc`` reads
    backwards from the end (or from the record after ``end_ns``, bisected) and stops once
    ``limit`` lines are found or it is past ``start_ns``. Lines before the file's first record
    take the file's start time (:func:`_source_start_ns`), but no later than that record."""
    try:
        f = path.open("rb")
    except OSError:
        return []
    with f:
        st = os.fstat(f.fileno())
        size, ref_ns = st.st_size, st.st_mtime_ns
        if size == 0 or query.start_ns > query.end_ns:
            return []
        source_start = _source_start_ns(st)
        if query.direction == "asc":
            out = _read_forward(f, size, query, replica, ref_ns, source_start)
        else:
            out = _read_backward(f, size, query, replica, ref_ns, source_start)[::-1]
    return select(out, query)


def _read_forward(
    f: BinaryIO, size: int, query: LogQuery, replica: str, ref_ns: int, source_start: int
) -> list[LogLine]:
    begin = _bisect(f, size, query.start_ns - ORDER_SLACK_NS, ref_ns) if size > _CHUNK else 0
    out: list[LogLine] = []
    orphans: list[ParsedLine] = []
    ts, level, rid = None, "INFO", None
    cutoff: int | None = None  # once ``limit`` lines are in: records after this cannot matter
    for _, raw in _forward_lines(f, begin, size):
        text = _decode(raw)
        if not text.strip():
            continue
        p = parse_line(text, ref_ns)
        if p.timestamp_ns is not None:
            if orphans:  # the file's first lines: at its start, no later than this record
                t0 = min(source_start, p.timestamp_ns)
                out.extend(x for x in (_orphan(o, t0, replica) for o in orphans) if in_query(x, query))
                orphans = []
            if p.timestamp_ns > query.end_ns + ORDER_SLACK_NS or (cutoff is not None and p.timestamp_ns > cutoff):
                break
            ts, level, rid = p.timestamp_ns, p.level or "INFO", p.request_id
            line = LogLine(ts, p.message, replica, level, rid)
        elif ts is None:
            orphans.append(p)
            continue
        else:
            line = LogLine(ts, p.message, replica, p.level or level, p.request_id or rid)
        if in_query(line, query):
            out.append(line)
            if cutoff is None and len(out) >= query.limit:
                cutoff = max(x.timestamp_ns for x in out) + ORDER_SLACK_NS
    else:
        out.extend(x for x in (_orphan(o, source_start, replica) for o in orphans) if in_query(x, query))
    return out


def _orphan(p: ParsedLine, ts: int, replica: str) -> LogLine:
    return LogLine(ts, p.message, replica, p.level or "INFO", p.request_id)


def _read_backward(
    f: BinaryIO, size: int, query: LogQuery, replica: str, ref_ns: int, source_start: int
) -> list[LogLine]:
    end = size
    if query.end_ns + ORDER_SLACK_NS < ref_ns and size > _CHUNK:  # skip what was written after end
        begin = _bisect(f, size, query.end_ns + ORDER_SLACK_NS, ref_ns)
        for off, raw in _forward_lines(f, begin, size):
            p = parse_line(_decode(raw), ref_ns)
            if p.timestamp_ns is not None and p.timestamp_ns > query.end_ns + ORDER_SLACK_NS:
                end = off
                break
    out: list[LogLine] = []  # newest first
    pending: list[ParsedLine] = []  # continuations, newest first, whose record is further up
    first_record_ts: int | None = None
    cutoff: int | None = None  # once ``limit`` lines are in: records before this cannot matter
    for _, raw in _reverse_lines(f, end):
        text = _decode(raw)
        if not text.strip():
            continue
        p = parse_line(text, ref_ns)
        if p.timestamp_ns is None:
            pending.append(p)
            continue
        ts, level, rid = p.timestamp_ns, p.level or "INFO", p.request_id
        first_record_ts = ts
        group = [LogLine(ts, c.message, replica, c.level or level, c.request_id or rid) for c in pending]
        group.append(LogLine(ts, p.message, replica, level, rid))
        pending = []
        out.extend(x for x in group if in_query(x, query))
        if ts < query.start_ns - ORDER_SLACK_NS or (cutoff is not None and ts < cutoff):
            return out
        if cutoff is None and len(out) >= query.limit:
            cutoff = min(x.timestamp_ns for x in out) - ORDER_SLACK_NS
    t0 = source_start if first_record_ts is None else min(source_start, first_record_ts)
    out.extend(x for x in (_orphan(p, t0, replica) for p in pending) if in_query(x, query))
    return out


__all__ = [
    "LEVEL_RANK",
    "KubeletLog",
    "ParsedLine",
    "in_query",
    "level_at_least",
    "parse_kubelet_log",
    "parse_line",
    "parse_rfc3339_ns",
    "read_log_file",
    "request_id_of",
    "select",
]
