"""``openloops admin {runs,samplers,deployments,served-models} show ID`` as a subprocess against real
Postgres: the row, its workload as the backend sees it from another process (a live local
process and its log; a Kubernetes Deployment, its pods and events from kmock) and the status
history."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control_plane.controller.reconciler import Controller
from control_plane.db.models import Run
from control_plane.runtime import build_runtime
from control_plane.scheduler.k8s_manifests import workload_name
from control_plane.scheduler.local import LocalProcessBackend
from control_plane.scheduler.protocol import WorkloadRole, WorkloadSpec
from control_plane.services import history as history_svc
from control_plane.services import samplers as samplers_svc
from control_plane.services.samplers import sampler_workload_id
from tests.control_plane.conftest import TEST_MODEL, make_settings, make_tenant
from tests.k8s.conftest import NAMESPACE, WORKER_SECRET, Cluster, Kubelet, cluster, kubelet, terminated, waiting  # noqa: F401
from tests.k8s.controller_env import k8s_runtime, k8s_settings, new_run, new_served_model
from tests.k8s.test_backend import k8s_event

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_state")]  # starts a worker process


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_plane.cli.main", "admin", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def base_env(services, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLOOPS_")}
    env.update(
        OPENLOOPS_DATABASE_URL=services.database_url,
        OPENLOOPS_REDIS_URL=services.redis_url,
        OPENLOOPS_DATA_DIR=str(data_dir),
        COLUMNS="200",
    )
    return env


def show(kind: str, rid: str, env: dict[str, str], *extra: str) -> dict:
    r = cli([kind, "show", rid, "--json", *extra], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


async def test_show_a_run_with_its_local_process(services, data_dir: Path) -> None:
    rt = build_runtime(make_settings(services, data_dir), with_backend=False)
    backend = LocalProcessBackend(data_dir / "workers")  # where the server's backend keeps them
    try:
        t = await make_tenant(rt, "acme")
        run = await new_run(rt, t)
        async with rt.db.transaction() as s:
            history_svc.transition(s, "run", await s.get(Run, run.id), history_svc.Status.LOADING_MODEL, "pod started")
        dep = run.deployment_id  # a run executes on its deployment's trainer
        assert dep is not None
        code = "print('trainer says hello', flush=True); import time; time.sleep(120)"
        await backend.ensure(
            WorkloadSpec(
                dep, WorkloadRole.TRAINER, t.org_id, run.session_id, TEST_MODEL, command=["python", "-c", code]
            )
        )
        pid = backend.pid(dep, WorkloadRole.TRAINER)
        log = data_dir / "workers" / f"trainer-{dep}.log"
        deadline = time.monotonic() + 30
        while "hello" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the workload never wrote its log line"
            await asyncio.sleep(0.05)
        env = base_env(services, data_dir)

        out = show("runs", run.id, env)
        assert out["run"]["id"] == run.id and out["run"]["status"] == "LOADING_MODEL"
        w = out["workload"]
        assert (w["backend"], w["role"], w["workload_id"], w["phase"]) == ("local", "trainer", dep, "starting")
        assert w["details"]["pid"] == pid and w["details"]["log"] == str(log)
        assert [e["message"] for e in w["events"]] == ["trainer says hello"]
        assert [(h["from"], h["to"], h["reason"]) for h in out["history"]] == [
            (None, "DEPLOYING", "created"),
            ("DEPLOYING", "LOADING_MODEL", "pod started"),
        ]
        assert [h["to"] for h in show("runs", run.id, env, "--history", "1")["history"]] == ["LOADING_MODEL"]

        text = cli(["runs", "show", run.id], env)
        assert text.returncode == 0, text.stderr
        for needle in (run.id, "LOADING_MODEL", "phase: starting", f"pid: {pid}", "trainer says hello", "pod started"):
            assert needle in text.stdout, needle
        missing = cli(["runs", "show", run.id, "--org", "someone-else"], env)
        assert missing.returncode == 1 and "not found" in missing.stderr

        await backend.scale(dep, WorkloadRole.TRAINER, 0)
        assert show("runs", run.id, env)["workload"]["phase"] == "scaled_down"
        await backend.scale(dep, WorkloadRole.TRAINER, 1)
        os.kill(backend.pid(dep, WorkloadRole.TRAINER), 9)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while (dead := show("runs", run.id, env)["workload"])["phase"] != "failed":
            assert time.monotonic() < deadline, dead
        assert dead["reason"] == "worker process is not running"
        await backend.remove(dep, WorkloadRole.TRAINER)
        assert show("runs", run.id, env)["workload"]["phase"] == "absent"

        async with rt.db.transaction() as s:
            smp = await samplers_svc.create_sampler(
                s, t.principal, rt.catalog, samplers_svc.SamplerRequest(session_id=None, base_model=TEST_MODEL)
            )
        out = show("samplers", smp.id, env, "--org", "acme")
        assert out["sampler"]["id"] == smp.id
        assert out["workload"]["workload_id"] == sampler_workload_id(TEST_MODEL)  # the shared server
        assert out["workload"]["phase"] == "absent"
    finally:
        await backend.close()
        await rt.close()


async def test_show_a_served_model_on_kubernetes(services, data_dir: Path, cluster: Cluster, kubelet: Kubelet) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        dep = await new_served_model(rt, await make_tenant(rt, "acme"))
        await Controller(rt).reconcile_once()
    name = workload_name(dep.id, WorkloadRole.SERVED_MODEL)
    pod = kubelet.create_pod(name, "k1l2m")
    kubelet.set_status(pod, waiting("served-model", "CrashLoopBackOff", restarts=2, last=terminated(1, "Error")))
    cluster.core.create_namespaced_event(
        NAMESPACE,
        k8s_event(
            "ev1", "Pod", pod, "BackOff", "Back-off restarting failed container", "2026-01-01T00:00:03Z", "Warning"
        ),
    )
    env = base_env(services, data_dir)
    env.update(
        OPENLOOPS_BACKEND="kubernetes",
        OPENLOOPS_KUBERNETES__API_URL=cluster.url,
        OPENLOOPS_KUBERNETES__IN_CLUSTER="false",
        OPENLOOPS_KUBERNETES__NAMESPACE=NAMESPACE,
        OPENLOOPS_KUBERNETES__WORKER_SECRET_NAME=WORKER_SECRET,
    )
    out = show("served-models", dep.id, env)
    assert out["served_model"]["id"] == dep.id and out["served_model"]["status"] == "DEPLOYING"
    w = out["workload"]
    assert (w["backend"], w["phase"], w["reason"]) == (
        "kubernetes",
        "failed",
        "CrashLoopBackOff (last exit code 1: Error)",
    )
    assert w["details"]["deployment"] == name and w["details"]["service"] == name
    assert [p["name"] for p in w["details"]["pods"]] == [pod] and w["details"]["pods"][0]["restarts"] == 2
    assert [(e["object"], e["reason"], e["type"]) for e in w["events"]] == [(f"Pod/{pod}", "BackOff", "Warning")]
    assert out["history"][0]["to"] == "DEPLOYING"
    text = cli(["served-models", "show", dep.id], env)
    assert text.returncode == 0 and f"pod: {pod}" in text.stdout and "BackOff" in text.stdout
    # the API server unreachable: the row and history are still shown, with the error
    env["OPENLOOPS_KUBERNETES__API_URL"] = "http://127.0.0.1:9"
    env["OPENLOOPS_KUBERNETES__API_RETRY_ATTEMPTS"] = "1"
    env["OPENLOOPS_KUBERNETES__API_TIMEOUT_SECONDS"] = "1"
    down = show("served-models", dep.id, env)
    assert down["served_model"]["id"] == dep.id and "cannot describe the workload" in down["workload"]["error"]
