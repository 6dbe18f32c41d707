"""Workloads as local subprocesses (local mode, and tests).

Each workload is one process group; its output goes to ``{work_dir}/{workload_id}.log``. An
exited process is reported FAILED (with its exit code and the tail of its log) and is never
restarted behind the controller's back: only ``remove`` forgets it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from control_plane.scheduler.protocol import Observation, Phase, WorkloadRole, WorkloadSpec

_SIGNALS = {getattr(signal, n): n for n in ("SIGKILL", "SIGTERM", "SIGSEGV", "SIGABRT", "SIGINT", "SIGBUS")}


@dataclass
class _Proc:
    spec: WorkloadSpec
    popen: subprocess.Popen[bytes] | None
    log_path: Path
    scaled_down: bool = False


def _safe_name(workload_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in workload_id)


class LocalProcessBackend:
    name = "local"

    def __init__(self, work_dir: Path, python: str | None = None, stop_timeout_s: float = 10.0) -> None:
        self._dir = work_dir
        self._python = python or sys.executable
        self._stop_timeout = stop_timeout_s
        self._procs: dict[tuple[str, WorkloadRole], _Proc] = {}
        self._http = httpx.AsyncClient(timeout=2.0)

    def _start(self, spec: WorkloadSpec, log_path: Path) -> subprocess.Popen[bytes]:
        self._dir.mkdir(parents=True, exist_ok=True)
        cmd = list(spec.command)
        if cmd and cmd[0] == "python":
            cmd[0] = self._python
        env = {**os.environ, **spec.env}
        if spec.port is not None:
            env["OPENLOOPS_PORT"] = str(spec.port)
        with log_path.open("ab") as log:
            return subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    async def ensure(self, spec: WorkloadSpec) -> None:
        key = (spec.workload_id, spec.role)
        if key in self._procs:
            return
        log_path = self._dir / f"{spec.role.value}-{_safe_name(spec.workload_id)}.log"
        popen = await asyncio.to_thread(self._start, spec, log_path) if spec.replicas > 0 else None
        self._procs[key] = _Proc(spec, popen, log_path, scaled_down=spec.replicas == 0)

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

    async def scale(self, workload_id: str, role: WorkloadRole, replicas: int) -> None:
        proc = self._procs.get((workload_id, role))
        if proc is None:
            return
        if replicas == 0:
            await self._stop(proc)
            proc.popen, proc.scaled_down = None, True
        elif proc.popen is None or proc.popen.poll() is not None:
            proc.popen = await asyncio.to_thread(self._start, proc.spec, proc.log_path)
            proc.scaled_down = False

    def _log_tail(self, path: Path, lines: int = 5) -> str:
        try:
            data = path.read_bytes()[-4000:].decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(x.strip() for x in data[-lines:] if x.strip())

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
        if proc.spec.port is None:
            return Observation(workload_id, role, Phase.STARTING)
        endpoint = f"http://127.0.0.1:{proc.spec.port}"
        try:
            r = await self._http.get(endpoint + (proc.spec.health_path or "/health"))
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        return Observation(workload_id, role, Phase.READY if ok else Phase.STARTING, endpoint=endpoint)

    async def list_workloads(self) -> list[tuple[str, WorkloadRole]]:
        return list(self._procs)

    def pid(self, workload_id: str, role: WorkloadRole) -> int | None:
        proc = self._procs.get((workload_id, role))
        return proc.popen.pid if proc and proc.popen else None

    async def close(self) -> None:
        await asyncio.gather(*(self._stop(p) for p in self._procs.values()))
        self._procs.clear()
        await self._http.aclose()
