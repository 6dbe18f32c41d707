"""A Kubernetes API stand-in for the backend tests: kmock's KubernetesEmulator served over HTTP
on 127.0.0.1 in its own thread (the backend's sync client and the test's event loop never share
a loop), one fresh emulator per test.

``ClusterEmulator`` adds what kmock leaves out and the backend relies on, as a real apiserver
would do it: ``metadata.uid``, ``creationTimestamp`` and a growing ``resourceVersion`` on every
write (and on LIST responses), watches that start after the requested resourceVersion and
answer ``410 Gone`` below ``expired_below``, and the garbage collector (deleting an object
deletes what names it in ``ownerReferences``). ``Kubelet`` plays the ReplicaSet controller and
the kubelet: it creates a Deployment's pods and patches their status. The LeaderWorkerSet custom
resource is served (as where the LWS CRD is installed) unless a test starts its
``Cluster(lws=False)``; tests/k8s/lws_cluster.py plays the LWS controller.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import kmock
import pytest
from kubernetes import client

from control_plane.scheduler.k8s_manifests import LABEL_ROLE, LABEL_WORKLOAD
from control_plane.scheduler.kubernetes import KubernetesBackend
from control_plane.scheduler.kubernetes_settings import KubernetesSettings
from control_plane.scheduler.protocol import Observation, Phase, Resources, WorkloadRole, WorkloadSpec

NAMESPACE = "openloops-wl"
WORKER_SECRET = "openloops-worker"
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
PODS = kmock.resource("", "v1", "pods")
LEADERWORKERSETS = kmock.resource("leaderworkerset.x-k8s.io", "v1", "leaderworkersets")


def now_iso(delta_seconds: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=delta_seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


class ClusterEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.rv = 1000
        self.expired_below = 0  # watches from an older resourceVersion get 410 Gone

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    async def _handle(self, request: kmock.Request) -> Any:
        owner_uid = None
        if request.resource is not None and isinstance(request.data, dict):
            if request.action == kmock.action.CREATE:
                meta = request.data.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", now_iso())
                meta["resourceVersion"] = self.next_rv()
            elif request.action == kmock.action.UPDATE:
                request.data.setdefault("metadata", {})["resourceVersion"] = self.next_rv()
        if request.resource is not None and request.action == kmock.action.DELETE and request.name:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                owner_uid = self.objects[key].get("metadata", {}).get("uid")
        response = await super()._handle(request)
        if owner_uid:
            await self.collect_garbage(owner_uid)
        return response

    async def collect_garbage(self, owner_uid: str) -> None:
        async with self._lock:
            victims = []
            for key, obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                refs = obj.get("metadata", {}).get("ownerReferences") or []
                if any(r.get("uid") == owner_uid for r in refs):
                    victims.append((key, obj))
            for key, obj in victims:
                raw = dict(obj.last.raw)
                obj.delete()
                await self._buses[key[0]].put({"type": "DELETED", "object": raw})
        for _, obj in victims:
            uid = obj.last.raw.get("metadata", {}).get("uid") if obj.last else None
            if uid:
                await self.collect_garbage(uid)

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(self.rv)
        return result

    async def _serve_watch(self, request: kmock.Request) -> Any:
        rv = request.params.get("resourceVersion")
        since = int(rv) if rv and rv.isdigit() else None
        if since is not None and since < self.expired_below:
            yield b""
            yield {
                "type": "ERROR",
                "object": {
                    "apiVersion": "v1",
                    "kind": "Status",
                    "status": "Failure",
                    "code": 410,
                    "reason": "Expired",
                    "message": f"too old resource version: {since} ({self.expired_below})",
                },
            }
            return
        async for event in super()._serve_watch(request):
            if since is not None and isinstance(event, dict) and event.get("type") in ("ADDED", "MODIFIED"):
                erv = (event.get("object") or {}).get("metadata", {}).get("resourceVersion")
                if erv and erv.isdigit() and int(erv) <= since:
                    continue  # a real apiserver sends only what happened after `since`
            yield event


class Cluster:
    """The emulator in a thread, plus helpers used from the test's own thread. ``lws``: serve
    the LeaderWorkerSet custom resource (False: a cluster without the LWS CRD, which answers
    404 for it)."""

    def __init__(self, *, lws: bool = True) -> None:
        self.lws = lws

    def start(self) -> Cluster:
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "kmock emulator did not start"
        self.api = client.ApiClient(client.Configuration(host=self.url))
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        return self

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with ClusterEmulator() as emu, kmock.Server(emu, host="127.0.0.1", port=0) as srv:
            self.emu = emu
            emu.resources.load_bundled()
            if self.lws:
                self._serve_lws()
            else:  # every call about it is 404, as from an API server that does not serve it
                emu[LEADERWORKERSETS][lambda _: not self.lws] << 404
            emu["get /version/"] << {"major": "1", "minor": "32", "gitVersion": "v1.32.0"}
            self.emu, self.url = emu, str(srv.url).rstrip("/")
            self.ready.set()
            await self._stop.wait()

    def _serve_lws(self) -> None:
        self.emu.resources[LEADERWORKERSETS] = {"namespaced": True, "kind": "LeaderWorkerSet"}

    def install_lws(self) -> None:
        """The LWS CRD is installed (a cluster started with ``lws=False``)."""
        self.lws = True
        self.on_loop(self._serve_lws)

    def stop(self) -> None:
        self.api.close()
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(5)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the emulator's loop (for reactions and silent object edits)."""

        async def _run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(_run(), self.loop).result(5)

    # --- state and request log -----------------------------------------------------------
    def objects(self, resource: kmock.resource) -> dict[str, dict[str, Any]]:
        def snap() -> dict[str, dict[str, Any]]:
            return {
                name: dict(obj.last.raw)
                for (res, ns, name), obj in self.emu.objects.items()
                if res == resource and ns == NAMESPACE and not obj.deleted
            }

        return self.on_loop(snap)

    def get(self, resource: kmock.resource, name: str) -> dict[str, Any] | None:
        return self.objects(resource).get(name)

    def requests(self) -> list[kmock.Request]:
        return self.on_loop(lambda: list(self.emu))

    def count(self, method: str, resource: kmock.resource, *, watch: bool | None = None) -> int:
        n = 0
        for r in self.requests():
            if r.resource != resource or r.method.value.upper() != method.upper():
                continue
            is_watch = r.params.get("watch") in ("true", "True", "1")
            if watch is not None and is_watch != watch:
                continue
            n += 1
        return n


class Kubelet:
    """Plays the ReplicaSet controller and the kubelet for one namespace."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster

    def create_pod(self, deployment: str, suffix: str = "abcde", status: dict[str, Any] | None = None) -> str:
        dep = self.c.get(DEPLOYMENTS, deployment)
        assert dep is not None, f"no deployment {deployment}"
        template = dep["spec"]["template"]
        name = f"{deployment}-{suffix}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "labels": dict(template["metadata"]["labels"]),
                "annotations": dict(template["metadata"].get("annotations") or {}),
                # a real pod is owned by the ReplicaSet that the Deployment owns
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": deployment,
                        "uid": dep["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": template["spec"],
        }
        self.c.core.create_namespaced_pod(NAMESPACE, pod)
        self.set_status(name, status or {"phase": "Pending"})
        return name

    def set_status(self, pod: str, status: dict[str, Any]) -> None:
        self.c.core.patch_namespaced_pod_status(pod, NAMESPACE, {"status": status})

    def delete_pod(self, pod: str) -> None:
        self.c.core.delete_namespaced_pod(pod, NAMESPACE)


class ReplicaSetPlayer:
    """Plays the ReplicaSet controller and the kubelet continuously, in its own thread: every
    managed Deployment gets as many pods as ``spec.replicas`` asks for (extra ones deleted),
    each Running and Ready when ``ready`` is set (Pending otherwise)."""

    def __init__(self, cluster: Cluster, *, ready: bool = True, interval: float = 0.02) -> None:
        self.c, self.kubelet, self.ready, self.interval = cluster, Kubelet(cluster), ready, interval
        self._stop = threading.Event()
        self._n = 0
        self.thread = threading.Thread(target=self._run, name="replicaset-player", daemon=True)

    def __enter__(self) -> ReplicaSetPlayer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except Exception:
                pass

    def step(self) -> None:
        pods = self.c.objects(PODS)
        for name, dep in self.c.objects(DEPLOYMENTS).items():
            want = int((dep.get("spec") or {}).get("replicas", 1))
            mine = sorted(p for p, obj in pods.items() if obj["metadata"]["labels"].get(LABEL_WORKLOAD) == name)
            for extra in mine[want:]:
                self.kubelet.delete_pod(extra)
            role = dep["metadata"]["labels"][LABEL_ROLE]
            status = running(role, ready=True, started=True) if self.ready else {"phase": "Pending"}
            for pod in mine[:want]:
                if (pods[pod].get("status") or {}).get("phase") != status["phase"]:
                    self.kubelet.set_status(pod, status)
            for _ in range(want - len(mine)):
                self._n += 1
                self.kubelet.create_pod(name, f"p{self._n:04d}", status=status)


# --- pod statuses as a kubelet writes them -------------------------------------------------


def cond(
    ctype: str, status: bool, reason: str | None = None, message: str | None = None, ago: float = 0
) -> dict[str, Any]:
    c: dict[str, Any] = {"type": ctype, "status": "True" if status else "False", "lastTransitionTime": now_iso(-ago)}
    if reason:
        c["reason"] = reason
    if message:
        c["message"] = message
    return c


def container(
    name: str,
    state: dict[str, Any],
    *,
    ready: bool = False,
    started: bool | None = None,
    restarts: int = 0,
    last: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cs: dict[str, Any] = {
        "name": name,
        "image": "img",
        "imageID": "",
        "ready": ready,
        "restartCount": restarts,
        "state": state,
        "lastState": last or {},
    }
    if started is not None:
        cs["started"] = started
    return cs


def unschedulable(ago: float) -> dict[str, Any]:
    return {
        "phase": "Pending",
        "conditions": [
            cond(
                "PodScheduled",
                False,
                "Unschedulable",
                "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                ago=ago,
            )
        ],
    }


def scheduled(
    role: str,
    state: dict[str, Any],
    *,
    phase: str = "Pending",
    ready: bool = False,
    started: bool | None = None,
    restarts: int = 0,
    last: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "phase": phase,
        "conditions": [cond("PodScheduled", True), cond("Ready", ready), cond("ContainersReady", ready)],
        "containerStatuses": [container(role, state, ready=ready, started=started, restarts=restarts, last=last)],
    }


def running(
    role: str, *, ready: bool, started: bool | None = None, restarts: int = 0, last: dict[str, Any] | None = None
) -> dict[str, Any]:
    return scheduled(
        role,
        {"running": {"startedAt": now_iso()}},
        phase="Running",
        ready=ready,
        started=started,
        restarts=restarts,
        last=last,
    )


def waiting(role: str, reason: str, message: str | None = None, **kw: Any) -> dict[str, Any]:
    w: dict[str, Any] = {"reason": reason}
    if message:
        w["message"] = message
    return scheduled(role, {"waiting": w}, **kw)


def terminated(exit_code: int, reason: str) -> dict[str, Any]:
    return {"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": now_iso(-5), "finishedAt": now_iso()}}


# --- specs ----------------------------------------------------------------------------------


def sampler_spec(workload_id: str = "smp:Alpha-01", **kw: Any) -> WorkloadSpec:
    args: dict[str, Any] = dict(
        workload_id=workload_id,
        role=WorkloadRole.SAMPLER,
        org_id="org_ACME",
        session_id="sess:42",
        base_model="Qwen/Qwen3-8B",
        command=["python", "-m", "data_plane.sampler", "--port", "8000"],
        env={"OPENLOOPS_SAMPLER_CONFIG": '{"model": "Qwen/Qwen3-8B"}', "LOG_LEVEL": "info"},
        secret_env=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
        port=8000,
        health_path="/health",
        resources=Resources(gpus=1, gpu_type="NVIDIA-H100-80GB-HBM3", cpu="8", memory="64Gi", shm="8Gi"),
    )
    args.update(kw)
    return WorkloadSpec(**args)


def trainer_spec(workload_id: str = "run:Trainer-7", **kw: Any) -> WorkloadSpec:
    args: dict[str, Any] = dict(
        workload_id=workload_id,
        role=WorkloadRole.TRAINER,
        org_id="org_ACME",
        session_id="sess:42",
        base_model="Qwen/Qwen3-8B",
        command=["python", "-m", "data_plane.trainer"],
        env={"OPENLOOPS_WORKER_CONFIG": '{"run_id": "run:Trainer-7"}'},
        secret_env=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
        resources=Resources(gpus=1, gpu_type="NVIDIA-H100-80GB-HBM3", cpu="8", memory="64Gi"),
    )
    args.update(kw)
    return WorkloadSpec(**args)


def served_model_spec(workload_id: str = "dep_XYZ", **kw: Any) -> WorkloadSpec:
    return sampler_spec(workload_id, role=WorkloadRole.SERVED_MODEL, **kw)


def backend_settings(url: str, **kw: Any) -> KubernetesSettings:
    args: dict[str, Any] = dict(
        namespace=NAMESPACE,
        api_url=url,
        in_cluster=False,
        trainer_image="registry.example.com/openloops/trainer:0.1.0",
        sampler_image="registry.example.com/openloops/sampler:0.1.0",
        image_pull_secrets=["regcred"],
        node_selector={"openloops.dev/pool": "gpu"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        priority_class_name="openloops-workers",
        service_account_name="openloops-worker",
        worker_secret_name=WORKER_SECRET,
        # fast restarts and retries for the tests
        watch_timeout_seconds=1,
        resync_seconds=120,
        api_timeout_seconds=5,
        api_retry_attempts=4,
        api_retry_base_delay_seconds=0.01,
        api_retry_max_delay_seconds=0.05,
    )
    args.update(kw)
    return KubernetesSettings(**args)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster().start()
    yield c
    c.stop()


@pytest.fixture
def kubelet(cluster: Cluster) -> Kubelet:
    return Kubelet(cluster)


@pytest.fixture
async def backend(cluster: Cluster) -> AsyncIterator[KubernetesBackend]:
    b = KubernetesBackend.from_settings(backend_settings(cluster.url))
    yield b
    await b.close()


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        res = check()
        if asyncio.iscoroutine(res) or isinstance(res, Awaitable):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


async def wait_phase(
    backend: KubernetesBackend,
    spec_or_id: WorkloadSpec | str,
    role: WorkloadRole | None = None,
    phase: Phase | None = None,
    timeout: float = 5.0,
    reason: str | None = None,
) -> Observation:
    if isinstance(spec_or_id, WorkloadSpec):
        wid, role = spec_or_id.workload_id, spec_or_id.role
    else:
        wid = spec_or_id
    assert role is not None and phase is not None
    last: list[Observation] = []

    async def check() -> bool:
        obs = await backend.observe(wid, role)
        last[:] = [obs]
        return obs.phase == phase and (reason is None or obs.reason == reason)

    try:
        await eventually(check, timeout, what=f"{role}/{wid} to be {phase} ({reason})")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last observation: {last}") from None
    return last[0]
