"""Workload logs and resource usage: the shared log parser (``workload_logs``) and
``LocalProcessBackend.logs`` / ``usage`` over real subprocesses (nothing of ours is patched)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

import pytest

from control_plane.scheduler.local import LocalProcessBackend
from control_plane.scheduler.protocol import (
    LogLine,
    LogQuery,
    WorkloadRole,
    WorkloadSpec,
)
from control_plane.scheduler.workload_logs import (
    ORDER_SLACK_NS,
    parse_line,
    read_log_file,
    request_id_of,
    select,
)

S = 10**9
MIB = 2**20


def stamp(t: float) -> str:
    """``t`` as the trainer worker's logging asctime (local time)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{round(t % 1 * 1000) % 1000:03d}"


def vllm_stamp(level: str, t: float) -> str:
    return time.strftime(f"{level} %m-%d %H:%M:%S", time.localtime(t))


# --- the parser ------------------------------------------------------------------------------------


def test_parse_worker_record() -> None:
    t = 1_796_000_000
    p = parse_line(f"{stamp(t)[:-4]},123 WARNING openloops.worker: slow step request_id=req-42.")
    assert p.timestamp_ns == t * S + 123_000_000
    assert p.level == "WARNING"
    assert p.message == "openloops.worker: slow step request_id=req-42."
    assert p.request_id == "req-42"


def test_parse_vllm_records() -> None:
    t = 1_796_000_000
    p = parse_line(f"{vllm_stamp('INFO', t)} [serving.py:12] done (request cmpl-7f3a-0)", reference_ns=(t + 5) * S)
    assert (p.timestamp_ns, p.level, p.message, p.request_id) == (
        t * S,
        "INFO",
        "[serving.py:12] done (request cmpl-7f3a-0)",
        "cmpl-7f3a-0",
    )
    p = parse_line(f"(EngineCore_DP0 pid=123) {vllm_stamp('ERROR', t)} [core.py:9] boom", reference_ns=t * S)
    assert (p.timestamp_ns, p.level, p.message) == (t * S, "ERROR", "(EngineCore_DP0 pid=123) [core.py:9] boom")


def test_vllm_year_is_the_one_before_the_reference() -> None:
    new_year = time.mktime((2027, 1, 1, 0, 0, 30, 0, 0, -1))
    p = parse_line("INFO 12-31 23:59:50 [a.py:1] last of the year", reference_ns=int(new_year * S))
    assert p.timestamp_ns == int(time.mktime((2026, 12, 31, 23, 59, 50, 0, 0, -1))) * S
    p = parse_line("INFO 01-01 00:00:10 [a.py:1] first", reference_ns=int(new_year * S))
    assert p.timestamp_ns == int(time.mktime((2027, 1, 1, 0, 0, 10, 0, 0, -1))) * S


def test_continuations_and_level_only_lines() -> None:
    for text in (
        "Traceback (most recent call last):",
        '  File "x.py", line 3, in f',
        "ValueError: boom",
        "step 3 loss=0.1",
    ):
        p = parse_line(text)
        assert (p.timestamp_ns, p.level, p.message) == (None, None, text)
    p = parse_line('(APIServer pid=7) INFO:     127.0.0.1:5 - "GET /health HTTP/1.1" 200 OK')
    assert (p.timestamp_ns, p.level) == (None, "INFO")
    p = parse_line("\x1b[32mINFO\x1b[0m 12-06 10:00:00 [a.py:1] colored", reference_ns=time.time_ns())
    assert p.level == "INFO" and p.message == "[a.py:1] colored"
    assert parse_line("2026-13-45 99:00:00,000 INFO x: not a date").timestamp_ns is None


def test_request_ids() -> None:
    assert request_id_of("done request_id=abc-1 in 3s") == "abc-1"
    assert request_id_of("done request_id='q:9/x' ok") == "q:9/x"
    assert request_id_of("Finished (request chatcmpl-55).") == "chatcmpl-55"
    assert request_id_of("request is slow") is None


def test_query_validation() -> None:
    assert LogQuery(0, 1, 1, "asc", "warn").min_level == "WARNING"
    for bad in ({"limit": 0}, {"limit": 1001}, {"direction": "up"}, {"min_level": "LOUD"}):
        args = {"start_ns": 0, "end_ns": 1, "limit": 10, "direction": "asc"} | bad
        with pytest.raises(ValueError):
            LogQuery(**args)  # type: ignore[arg-type]


# --- reading a file: backwards / bisected must equal a plain forward parse ------------------------


def reference_lines(path: Path, replica: str) -> list[LogLine]:
    """Every line of the file, parsed front to back in the simplest way."""
    st = path.stat()
    lines, orphans = [], []
    ts, level, rid = None, "INFO", None
    for text in path.read_text().splitlines():
        if not text.strip():
            continue
        p = parse_line(text, st.st_mtime_ns)
        if p.timestamp_ns is not None:
            lines += [
                LogLine(min(st.st_ctime_ns, p.timestamp_ns), o.message, replica, o.level or "INFO", o.request_id)
                for o in orphans
            ]
            orphans = []
            ts, level, rid = p.timestamp_ns, p.level, p.request_id
            lines.append(LogLine(ts, p.message, replica, level or "INFO", rid))
        elif ts is None:
            orphans.append(p)
        else:
            lines.append(LogLine(ts, p.message, replica, p.level or level or "INFO", p.request_id or rid))
    lines += [LogLine(st.st_ctime_ns, o.message, replica, o.level or "INFO", o.request_id) for o in orphans]
    return lines


def write_big_log(path: Path, t0: float, n: int, rng: random.Random) -> None:
    levels = ["DEBUG", "INFO", "INFO", "INFO", "WARNING", "ERROR"]
    out = ["starting (no logging configured yet)", "second orphan line"]
    for i in range(n):
        jitter = rng.uniform(-0.4, 0.4) if i % 7 == 0 else 0.0  # two processes' records interleave
        t = t0 + i * 0.5 + jitter
        rid = f" request_id=r{i}" if i % 11 == 0 else ""
        out.append(f"{stamp(t)} {rng.choice(levels)} test.worker: event {i}{rid}")
        if i % 13 == 0:
            out += ["Traceback (most recent call last):", '  File "w.py", line 1, in <module>', f"KeyError: {i}"]
        if i % 17 == 0:
            out.append(f"{vllm_stamp('WARNING', t)} [x.py:1] vllm style {i} (request v{i})")
        if i % 19 == 0:
            out.append("")
    path.write_text("\n".join(out) + "\n")


def test_file_reads_match_a_forward_parse(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "trainer-big.log"
    t0 = int(time.time()) - 10 * 86400
    write_big_log(path, t0, 6000, rng)
    assert path.stat().st_size > 5 * 64 * 1024  # several chunks: bisection and backward reads matter
    span = 6000 * 0.5
    queries = [
        LogQuery(0, time.time_ns(), 1000, "asc"),
        LogQuery(0, time.time_ns(), 1000, "desc"),
        LogQuery(0, time.time_ns(), 3, "asc"),  # the orphan lines first
    ]
    for _ in range(40):
        a = t0 + rng.uniform(-10, span)
        b = a + rng.choice([0.5, 3, 60, 600, span])
        queries.append(
            LogQuery(
                int(a * S),
                int(b * S),
                rng.choice([1, 5, 50, 1000]),
                rng.choice(["asc", "desc"]),
                rng.choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
            )
        )
    everything = reference_lines(path, "trainer-big.log")
    for q in queries:
        assert read_log_file(path, q, "trainer-big.log") == select(everything, q), q
    first = {x.message: x for x in read_log_file(path, LogQuery(0, time.time_ns(), 5, "asc"), "r")}
    # the lines before the first record: no later than that record (the file's ctime is later)
    event0 = first["test.worker: event 0 request_id=r0"].timestamp_ns
    assert first["starting (no logging configured yet)"].timestamp_ns == event0
    assert first["second orphan line"].timestamp_ns == event0
    assert read_log_file(tmp_path / "missing.log", queries[0], "r") == []


def test_desc_reads_only_the_end_of_a_big_file(tmp_path: Path) -> None:
    path = tmp_path / "trainer-huge.log"
    t0 = int(time.time()) - 86400
    with path.open("w") as f:
        for i in range(200_000):
            f.write(f"{stamp(t0 + i * 0.1)} INFO test.worker: event {i}\n")
    start = time.perf_counter()
    got = read_log_file(path, LogQuery(0, time.time_ns(), 10, "desc"), "r")
    last = read_log_file(path, LogQuery(int((t0 + 100) * S), time.time_ns(), 10, "asc"), "r")
    elapsed = time.perf_counter() - start
    assert [x.message for x in got] == [f"test.worker: event {i}" for i in range(199_999, 199_989, -1)]
    assert [x.message for x in last] == [f"test.worker: event {i}" for i in range(1000, 1010)]
    assert elapsed < 1.0, f"{elapsed:.2f}s: the whole file was parsed"  # a full parse takes several seconds


# --- the local backend, over real processes ----------------------------------------------------------

# logs in the worker's format (a past hour with fixed times, then live records), allocates memory
# and starts a child that allocates more and keeps a core half busy
WORKLOAD = r"""
import logging, os, subprocess, sys, time
base = int(sys.argv[1])
alloc = int(sys.argv[2])
def stamp(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + ",000"
print("booting, logging not configured yet", flush=True)
for i in range(10):
    level = ["DEBUG", "INFO", "WARNING", "ERROR", "INFO"][i % 5]
    rid = f" request_id=req-{i}" if i % 3 == 0 else ""
    print(f"{stamp(base + i)} {level} test.worker: event {i}{rid}", flush=True)
    if i == 3:
        print('Traceback (most recent call last):\n  File "w.py", line 9, in step\nValueError: boom', flush=True)
print(time.strftime("INFO %m-%d %H:%M:%S", time.localtime(base + 10)) + " [api.py:12] served (request cmpl-77)", flush=True)
print(f"(EngineCore pid={os.getpid()}) " + time.strftime("WARNING %m-%d %H:%M:%S", time.localtime(base + 11)) + " [core.py:3] kv cache low", flush=True)
child = subprocess.Popen([sys.executable, "-c", (
    "import time\n"
    f"ballast = bytearray({alloc})\n"
    "for j in range(0, len(ballast), 4096): ballast[j] = 1\n"
    "while True:\n"
    "    end = time.monotonic() + 0.01\n"
    "    while time.monotonic() < end: pass\n"
    "    time.sleep(0.01)\n"
)])
ballast = bytearray(alloc)
for j in range(0, len(ballast), 4096):
    ballast[j] = 1
logging.basicConfig(level="DEBUG", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
logging.getLogger("test.worker").info("ready request_id=live-1")
sys.stdout.flush()
child.wait()
"""

ALLOC = 48 * MIB


async def wait_for(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def workload(tmp_path: Path):
    backend = LocalProcessBackend(tmp_path / "workers", stop_timeout_s=3)
    base = int(time.time()) - 3600
    spec = WorkloadSpec(
        "run:w1", WorkloadRole.TRAINER, "org-1", None, "m", command=["python", "-c", WORKLOAD, str(base), str(ALLOC)]
    )
    try:
        await backend.ensure(spec)
        await wait_for(tmp_path / "workers" / "trainer-run_w1.log", "ready request_id=live-1")
        yield backend, spec, base
    finally:
        await backend.close()


def msgs(lines: list[LogLine]) -> list[str]:
    return [x.message for x in lines]


async def test_logs_of_a_running_workload(workload) -> None:
    backend, spec, base = workload
    wid, role = spec.workload_id, spec.role
    now = time.time_ns()

    newest = await backend.logs(wid, role, LogQuery(base * S, now, 3, "desc"))
    assert msgs(newest) == [
        "test.worker: ready request_id=live-1",
        f"(EngineCore pid={backend.pid(wid, role)}) [core.py:3] kv cache low",
        "[api.py:12] served (request cmpl-77)",
    ]
    assert [x.level for x in newest] == ["INFO", "WARNING", "INFO"]
    assert [x.request_id for x in newest] == ["live-1", None, "cmpl-77"]
    assert newest[0].timestamp_ns > (base + 3000) * S and newest[1].timestamp_ns == (base + 11) * S
    assert {x.replica for x in newest} == {"trainer-run_w1.log"}

    # oldest first: the line printed before logging was set up takes the first record's time
    oldest = await backend.logs(wid, role, LogQuery(0, now, 6, "asc"))
    assert msgs(oldest) == [
        "booting, logging not configured yet",
        "test.worker: event 0 request_id=req-0",
        "test.worker: event 1",
        "test.worker: event 2",
        "test.worker: event 3 request_id=req-3",
        "Traceback (most recent call last):",
    ]
    assert oldest[0].timestamp_ns == oldest[1].timestamp_ns == base * S
    assert [x.level for x in oldest] == ["INFO", "DEBUG", "INFO", "WARNING", "ERROR", "ERROR"]

    # a time range; the traceback's lines carry the time, level and request id of their record
    window = await backend.logs(wid, role, LogQuery((base + 2) * S, (base + 4) * S, 100, "asc"))
    assert msgs(window) == [
        "test.worker: event 2",
        "test.worker: event 3 request_id=req-3",
        "Traceback (most recent call last):",
        '  File "w.py", line 9, in step',
        "ValueError: boom",
        "test.worker: event 4",
    ]
    assert [x.timestamp_ns // S - base for x in window] == [2, 3, 3, 3, 3, 4]
    assert [x.request_id for x in window] == [None, "req-3", "req-3", "req-3", "req-3", None]
    desc = await backend.logs(wid, role, LogQuery((base + 2) * S, (base + 4) * S, 100, "desc"))
    assert desc == window[::-1]

    # min_level
    warnings = await backend.logs(wid, role, LogQuery(base * S, now, 100, "asc", min_level="WARNING"))
    assert msgs(warnings) == [
        "test.worker: event 2",
        "test.worker: event 3 request_id=req-3",
        "Traceback (most recent call last):",
        '  File "w.py", line 9, in step',
        "ValueError: boom",
        "test.worker: event 7",
        "test.worker: event 8",
        f"(EngineCore pid={backend.pid(wid, role)}) [core.py:3] kv cache low",
    ]
    errors = await backend.logs(wid, role, LogQuery(base * S, now, 2, "desc", min_level="error"))
    assert msgs(errors) == ["test.worker: event 8", "ValueError: boom"]

    # nothing in range, no such workload
    assert await backend.logs(wid, role, LogQuery((base - 100) * S, (base - 50) * S, 10, "asc")) == []
    assert await backend.logs("nope", role, LogQuery(0, now, 10, "desc")) == []


async def test_usage_of_a_running_workload(workload, tmp_path: Path) -> None:
    backend, spec, _ = workload
    pid = backend.pid(spec.workload_id, spec.role)
    (first,) = await backend.usage(spec.workload_id, spec.role)
    assert first.replica == f"local-{pid}" and first.node == socket.gethostname()
    # the workload and its child each hold ALLOC: both counted, within a factor of the allocation
    assert first.memory_bytes is not None and 2 * ALLOC <= first.memory_bytes <= 4 * ALLOC
    assert first.cpu_cores is not None and first.cpu_cores >= 0
    log_size = (tmp_path / "workers" / "trainer-run_w1.log").stat().st_size
    assert first.ephemeral_bytes is not None and first.ephemeral_bytes >= log_size
    assert first.ephemeral_capacity_bytes and first.ephemeral_capacity_bytes > first.ephemeral_bytes

    await asyncio.sleep(0.5)
    started = time.perf_counter()
    (second,) = await backend.usage(spec.workload_id, spec.role)
    assert time.perf_counter() - started < 0.2  # the difference since the first call: no waiting
    # the child keeps about half a core busy (the machine is shared: only check it shows)
    assert second.cpu_cores is not None and 0.02 < second.cpu_cores < os.cpu_count() + 0.5  # type: ignore[operator]

    assert await backend.usage("nope", spec.role) == []
    await backend.scale(spec.workload_id, spec.role, 0)
    assert await backend.usage(spec.workload_id, spec.role) == []


async def test_another_backend_instance_reads_logs_and_usage(workload, tmp_path: Path) -> None:
    backend, spec, base = workload
    other = LocalProcessBackend(tmp_path / "workers")  # e.g. the API process: it started nothing
    try:
        q = LogQuery(base * S, time.time_ns(), 1000, "asc")
        assert await other.logs(spec.workload_id, spec.role, q) == await backend.logs(spec.workload_id, spec.role, q)
        (sample,) = await other.usage(spec.workload_id, spec.role)
        assert sample.replica == f"local-{backend.pid(spec.workload_id, spec.role)}"  # the pid from the state file
        assert sample.memory_bytes is not None and sample.memory_bytes >= 2 * ALLOC
        assert sample.cpu_cores is not None and sample.cpu_cores >= 0

        await backend.remove(spec.workload_id, spec.role)
        assert await other.usage(spec.workload_id, spec.role) == []
        # the log outlives the workload
        assert await other.logs(spec.workload_id, spec.role, LogQuery(0, time.time_ns(), 1, "desc")) != []
    finally:
        await other.close()


async def test_usage_ignores_a_reused_pid(tmp_path: Path) -> None:
    work = tmp_path / "workers"
    work.mkdir()
    # a state file whose pid now belongs to another process (here: this test's own)
    state = {
        "workload_id": "x",
        "role": "sampler",
        "pid": os.getpid(),
        "started_at": time.time() - 86400,
        "port": None,
        "health_path": None,
        "scaled_down": False,
        "log": str(work / "sampler-x.log"),
    }
    (work / "sampler-x.state.json").write_text(json.dumps(state))
    backend = LocalProcessBackend(work)
    try:
        assert await backend.usage("x", WorkloadRole.SAMPLER) == []
    finally:
        await backend.close()


async def test_print_only_workload(tmp_path: Path) -> None:
    """No log record at all: every line is a continuation of nothing, timed at the file's start."""
    backend = LocalProcessBackend(tmp_path / "workers")
    script = "import sys\nprint('hello')\nprint('Traceback (most recent call last):')\nsys.exit(3)\n"
    try:
        before = time.time_ns()
        await backend.ensure(
            WorkloadSpec("p", WorkloadRole.SAMPLER, "o", None, "m", command=[sys.executable, "-c", script])
        )
        await wait_for(tmp_path / "workers" / "sampler-p.log", "Traceback")
        await asyncio.sleep(0.1)
        lines = await backend.logs("p", WorkloadRole.SAMPLER, LogQuery(before - S, time.time_ns() + S, 10, "asc"))
        assert msgs(lines) == ["hello", "Traceback (most recent call last):"]
        assert {x.level for x in lines} == {"INFO"}
        assert all(before - ORDER_SLACK_NS <= x.timestamp_ns <= time.time_ns() for x in lines)
    finally:
        await backend.close()
