"""Workloads as local subprocesses (local mode, and tests).

Each workload is one process group; its output goes to ``{work_dir}/{role}-{workload_id}.log``
and a small state file (``.state.json``: pid, its start time, port, scaled down or not) lets
another process (the admin CLI, the API) ``describe`` it and read its ``logs`` and ``usage``. An
exited process is reported FAILED (with its exit code and the tail of its log) and is never
restarted behind the controller's back: only ``remove`` forgets it.

``logs`` parses the log file (``workload_logs``; replica = the file name, since the file spans
restarts). ``usage`` measures the workload's process tree with psutil (the process, its
descendants and anything left in its process group): memory = the sum of their RSS (pages
shared between them count once per process); cpu_cores = the CPU time they used since the
previous ``usage`` call of this backend for the same process, divided by the wall time between
the calls; when there is no previous call (or it is older than ``usage_max_window_s``) the
first call measures over ``usage_interval_s`` (0.25 s) instead, so it always answers a current
rate, never None; ephemeral_bytes = the workload's files under the work dir (its log, its state
file, a ``{role}-{id}/`` directory if it has one); ephemeral_capacity_bytes = the size of the
work dir's filesystem; node = the host name.

``WorkloadSpec.capacity`` is ignored: every workload runs on this host.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from control_plane.scheduler.protocol import (
    BackendError,
    LogLine,
    LogQuery,
    Observation,
    Phase,
    UsageSample,
    WorkloadDescription,
    WorkloadEvent,
    WorkloadRole,
    WorkloadSpec,
)
from control_plane.scheduler.workload_logs import read_log_file

_SIGNALS = {getattr(signal, n): n for n in ("SIGKILL", "SIGTERM", "SIGSEGV", "SIGABRT", "SIGINT", "SIGBUS")}


@dataclass
class _Proc:
    spec: WorkloadSpec
    popen: subprocess.Popen[bytes] | None
    log_path: Path
    scaled_down: bool = False
    started_at: float | None = None  # wall time of the spawn (tells the pid from a reused one)


# cumulative CPU seconds per process (pid, create time) of one workload, and when they were read
_CpuSample = tuple[float, float, dict[tuple[int, float], float]]  # (monotonic, wall, times)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not reaped yet is a zombie: not running
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] != "Z"
    except (OSError, ValueError):
        return True


def _safe_name(workload_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in workload_id)


class LocalProcessBackend:
    name = "local"
    isolated_workloads = False  # workloads share 127.0.0.1: each serving workload needs its own port

    def __init__(
        self,
        work_dir: Path,
        python: str | None = None,
        stop_timeout_s: float = 10.0,
        *,
        usage_interval_s: float = 0.25,
        usage_max_window_s: float = 120.0,
    ) -> None:
        self._dir = work_dir
        self._python = python or sys.executable
        self._stop_timeout = stop_timeout_s
        self._procs: dict[tuple[str, WorkloadRole], _Proc] = {}
        self._http = httpx.AsyncClient(timeout=2.0)
        self._usage_interval = usage_interval_s
        self._usage_max_window = usage_max_window_s
        self._cpu: dict[tuple[str, WorkloadRole, int], _CpuSample] = {}

    def _base(self, workload_id: str, role: WorkloadRole) -> Path:
        return self._dir / f"{WorkloadRole(role).value}-{_safe_name(workload_id)}"

    def _start(self, spec: WorkloadSpec, log_path: Path) -> subprocess.Popen[bytes]:
        self._dir.mkdir(parents=True, exist_ok=True)
        cmd = list(spec.command)
        if not cmd:
            raise BackendError(f"{spec.role} {spec.workload_id!r}: empty command")
        if cmd[0] == "python":
            cmd[0] = self._python
        env = {**os.environ, **spec.env}
        if spec.port is not None:
            env["OPENLOOPS_PORT"] = str(spec.port)
        try:
            with log_path.open("ab") as log:
                return subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
                )
        except OSError as exc:  # no such executable, permissions: retrying will not help
            raise BackendError(f"cannot start {spec.role} {spec.workload_id!r}: {exc}") from exc

    def _write_state(self, proc: _Proc) -> None:
        state = {
            "workload_id": proc.spec.workload_id,
            "role": proc.spec.role.value,
            "pid": proc.popen.pid if proc.popen else None,
            "started_at": proc.started_at if proc.popen else None,
            "port": proc.spec.port,
            "health_path": proc.spec.health_path,
            "scaled_down": proc.scaled_down,
            "log": str(proc.log_path),
        }
        path = self._base(proc.spec.workload_id, proc.spec.role).with_suffix(".state.json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def _read_state(self, workload_id: str, role: WorkloadRole) -> dict | None:
        try:
            return dict(json.loads(self._base(workload_id, role).with_suffix(".state.json").read_text()))
        except (OSError, ValueError):
            return None

    async def ensure(self, spec: WorkloadSpec) -> None:
        key = (spec.workload_id, spec.role)
        if key in self._procs:
            return
        log_path = self._base(spec.workload_id, spec.role).with_suffix(".log")
        popen = await asyncio.to_thread(self._start, spec, log_path) if spec.replicas > 0 else None
        self._procs[key] = proc = _Proc(spec, popen, log_path, scaled_down=spec.replicas == 0, started_at=time.time())
        self._write_state(proc)

    async def _stop(self, proc: _Proc) -> None:
        p = proc.popen
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(p.wait), self._stop_timeout)
        except TimeoutError:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await asyncio.to_thread(p.wait)

    async def remove(self, workload_id: str, role: WorkloadRole) -> None:
        proc = self._procs.pop((workload_id, role), None)
        if proc is not None:
            await self._stop(proc)
        self._base(workload_id, role).with_suffix(".state.json").unlink(missing_ok=True)

    async def scale(self, workload_id: str, role: WorkloadRole, replicas: int) -> None:
        if replicas < 0:
            raise BackendError(f"replicas must be >= 0, got {replicas}")
        proc = self._procs.get((workload_id, role))
        if proc is None:
            raise BackendError(f"cannot scale {role} {workload_id!r}: no such workload (ensure it first)")
        if replicas == 0:
            # scaled down from now on: its exit while it drains is not a failure to observe
            proc.scaled_down = True
            await self._stop(proc)
            proc.popen = None
        elif proc.popen is None or proc.popen.poll() is not None:
            proc.popen = await asyncio.to_thread(self._start, proc.spec, proc.log_path)
            proc.started_at = time.time()
            proc.scaled_down = False
        self._write_state(proc)

    def _log_lines(self, path: Path, lines: int) -> list[str]:
        try:
            with path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max(4000, 200 * lines)))
                data = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        return [x.strip() for x in data if x.strip()][-lines:]

    def _log_tail(self, path: Path, lines: int = 5) -> str:
        return " | ".join(self._log_lines(path, lines))

    async def observe(self, workload_id: str, role: WorkloadRole) -> Observation:
        proc = self._procs.get((workload_id, role))
        if proc is None:
            return Observation(workload_id, role, Phase.ABSENT)
        if proc.scaled_down:
            return Observation(workload_id, role, Phase.SCALED_DOWN)
        p = proc.popen
        assert p is not None
        code = p.poll()
        if code is not None:
            how = f"killed by {_SIGNALS.get(-code, f'signal {-code}')}" if code < 0 else f"exited with code {code}"
            tail = self._log_tail(proc.log_path)
            reason = f"worker process {how}" + (f": {tail}" if tail else "")
            return Observation(workload_id, role, Phase.FAILED, reason=reason[:2000], exit_code=code)
        return await self._observe_http(workload_id, role, proc.spec.port, proc.spec.health_path)

    async def _observe_http(
        self, workload_id: str, role: WorkloadRole, port: int | None, health_path: str | None
    ) -> Observation:
        if port is None:
            return Observation(workload_id, role, Phase.STARTING)
        endpoint = f"http://127.0.0.1:{port}"
        try:
            r = await self._http.get(endpoint + (health_path or "/health"))
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        return Observation(workload_id, role, Phase.READY if ok else Phase.STARTING, endpoint=endpoint)

    async def list_workloads(self) -> list[tuple[str, WorkloadRole]]:
        return list(self._procs)

    async def describe(self, workload_id: str, role: WorkloadRole, *, max_events: int = 20) -> WorkloadDescription:
        """From this backend's own processes, or (another process, e.g. the admin CLI) from
        the state file the owning backend keeps; events are the last lines of the log."""
        role = WorkloadRole(role)
        state = self._read_state(workload_id, role)
        log_path = self._base(workload_id, role).with_suffix(".log")
        if (workload_id, role) in self._procs:
            obs = await self.observe(workload_id, role)
        elif state is None:
            obs = Observation(workload_id, role, Phase.ABSENT)
        elif state.get("scaled_down"):
            obs = Observation(workload_id, role, Phase.SCALED_DOWN)
        elif not _alive(state.get("pid")):
            obs = Observation(workload_id, role, Phase.FAILED, reason="worker process is not running")
        else:
            obs = await self._observe_http(workload_id, role, state.get("port"), state.get("health_path"))
        details: dict = {"work_dir": str(self._dir), "log": str(log_path)}
        if state is not None:
            details.update(pid=state.get("pid"), port=state.get("port"), scaled_down=state.get("scaled_down"))
        lines = self._log_lines(log_path, max_events) if max_events > 0 else []
        events = [WorkloadEvent(message=x, object=log_path.name) for x in lines]
        return WorkloadDescription(obs, details, events)

    async def logs(self, workload_id: str, role: WorkloadRole, query: LogQuery) -> list[LogLine]:
        """From the workload's log file (which outlives ``remove``); [] when there is none."""
        path = self._base(workload_id, WorkloadRole(role)).with_suffix(".log")
        return await asyncio.to_thread(read_log_file, path, query, path.name)

    async def usage(self, workload_id: str, role: WorkloadRole) -> list[UsageSample]:
        """One sample for the workload's process tree while it runs, else []. From this
        backend's own process, or from the state file the owning backend keeps."""
        role = WorkloadRole(role)
        proc = self._procs.get((workload_id, role))
        if proc is not None:
            running = not proc.scaled_down and proc.popen is not None and proc.popen.poll() is None
            pid, started = (proc.popen.pid, proc.started_at) if running and proc.popen else (None, None)
        else:
            state = self._read_state(workload_id, role) or {}
            alive = not state.get("scaled_down") and _alive(state.get("pid"))
            pid, started = (state["pid"], state.get("started_at")) if alive else (None, None)
        if pid is None:
            self._forget_cpu(workload_id, role)
            return []
        return await asyncio.to_thread(self._usage_of, workload_id, role, pid, started)

    def _forget_cpu(self, workload_id: str, role: WorkloadRole, keep: int | None = None) -> None:
        for key in [k for k in list(self._cpu) if k[:2] == (workload_id, role) and k[2] != keep]:
            self._cpu.pop(key, None)

    def _usage_of(self, workload_id: str, role: WorkloadRole, pid: int, started: object) -> list[UsageSample]:
        try:
            root = psutil.Process(pid)
            if isinstance(started, int | float) and abs(root.create_time() - started) > 5.0:
                return []  # the pid now belongs to another process
        except psutil.Error:
            self._forget_cpu(workload_id, role)
            return []
        key = (workload_id, role, pid)
        prev = self._cpu.get(key)
        if prev is None or time.monotonic() - prev[0] > self._usage_max_window:
            prev = _cpu_sample(_process_tree(root))
            time.sleep(self._usage_interval)
        procs = _process_tree(root)
        now = _cpu_sample(procs)
        self._forget_cpu(workload_id, role, keep=pid)  # a previous process's sample
        self._cpu[key] = now
        elapsed = now[0] - prev[0]
        used = 0.0
        for proc_key, cpu in now[2].items():
            if proc_key in prev[2]:
                used += max(0.0, cpu - prev[2][proc_key])
            elif proc_key[1] >= prev[1] - 1.0:  # born since the previous sample
                used += cpu
        rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        base = self._base(workload_id, role)
        try:
            capacity: int | None = shutil.disk_usage(self._dir).total
        except OSError:
            capacity = None
        return [
            UsageSample(
                replica=f"local-{pid}",
                node=socket.gethostname(),
                cpu_cores=round(used / elapsed, 4) if elapsed > 0 else 0.0,
                memory_bytes=rss,
                ephemeral_bytes=_files_size(base),
                ephemeral_capacity_bytes=capacity,
            )
        ]

    def pid(self, workload_id: str, role: WorkloadRole) -> int | None:
        proc = self._procs.get((workload_id, role))
        return proc.popen.pid if proc and proc.popen else None

    async def close(self) -> None:
        await asyncio.gather(*(self._stop(p) for p in self._procs.values()))
        self._procs.clear()
        await self._http.aclose()


def _process_tree(root: psutil.Process) -> list[psutil.Process]:
    """The workload's processes: its root, every descendant, and whatever else is still in its
    process group (the root leads its own session: ``start_new_session``)."""
    procs = {root.pid: root}
    try:
        for child in root.children(recursive=True):
            procs[child.pid] = child
    except psutil.Error:
        pass
    for p in psutil.process_iter():
        if p.pid in procs:
            continue
        try:
            if os.getpgid(p.pid) == root.pid:
                procs[p.pid] = p
        except OSError:
            continue
    return list(procs.values())


def _cpu_sample(procs: list[psutil.Process]) -> _CpuSample:
    times: dict[tuple[int, float], float] = {}
    for p in procs:
        try:
            t = p.cpu_times()
            times[(p.pid, p.create_time())] = t.user + t.system
        except psutil.Error:  # exited or a zombie meanwhile
            continue
    return time.monotonic(), time.time(), times


def _files_size(base: Path) -> int:
    """Bytes of ``{base}.*`` files and of everything under a ``{base}/`` directory."""
    total = 0
    try:
        entries = list(os.scandir(base.parent))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name == base.name or entry.name.startswith(base.name + ".")):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
            elif entry.is_dir(follow_symlinks=False):
                for root, _, files in os.walk(entry.path):
                    for name in files:
                        try:
                            total += os.lstat(os.path.join(root, name)).st_size
                        except OSError:
                            pass
        except OSError:
            continue
    return total
