"""KubernetesBackend.logs / usage over HTTP against kmock's emulator, with the real client.

kmock serves neither pod logs nor metrics by itself, but both can be taught through its own
API: ``PodLogs`` answers ``GET .../pods/{name}/log`` as a kubelet does (``container``,
``previous``, ``timestamps``, ``sinceSeconds``, ``tailLines``, ``limitBytes``; 404 for a missing
pod, 400 for a container with no log), and PodMetrics are plain objects of
``metrics.k8s.io/v1beta1/pods`` in the emulator's store (absent = 404, as without a
metrics-server). Nothing of ours is patched.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import kmock
import pytest

from control_plane.scheduler.k8s_errors import KubernetesUnavailableError
from control_plane.scheduler.k8s_manifests import workload_name
from control_plane.scheduler.k8s_usage import (
    parse_quantity,
    quantity_bytes,
    usage_sample,
)
from control_plane.scheduler.kubernetes import KubernetesBackend
from control_plane.scheduler.protocol import (
    LogLine,
    LogQuery,
    TransientBackendError,
    WorkloadRole,
)
from control_plane.scheduler.workload_logs import parse_kubelet_log, parse_rfc3339_ns
from tests.k8s.conftest import (
    NAMESPACE,
    PODS,
    Cluster,
    Kubelet,
    backend_settings,
    running,
    sampler_spec,
    scheduled,
    trainer_spec,
)

S = 10**9
METRICS = kmock.resource("metrics.k8s.io", "v1beta1", "pods")


def rfc3339nano(ts_ns: int) -> str:
    """As the container runtime writes it (Go's RFC3339Nano: trailing zeros trimmed)."""
    secs, frac = divmod(ts_ns, S)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    digits = f"{frac:09d}".rstrip("0")
    return text + (f".{digits}" if digits else "") + "Z"


class PodLogs:
    """The kubelet's log endpoint, taught to the emulator: lines stored per (pod, container,
    previous), filtered and cut the way the kubelet does."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.lines: dict[tuple[str, str, bool], list[tuple[int, str]]] = {}
        self.params: list[dict[str, str]] = []
        cluster.on_loop(lambda: cluster.emu[PODS, kmock.subresource("log")] << self._serve)

    def add(self, pod: str, container: str, lines: list[tuple[int, str]], *, previous: bool = False) -> None:
        self.lines.setdefault((pod, container, previous), []).extend(lines)

    def _serve(self, request: kmock.Request) -> bytes:
        q = dict(request.params)
        self.params.append({"pod": str(request.name), **q})
        key = (PODS, request.namespace, request.name)
        obj = self.c.emu.objects[key] if key in self.c.emu.objects else None  # noqa: SIM401 - no .get()
        if obj is None or obj.deleted:
            raise kmock.KubernetesNotFoundError(message=f'pods "{request.name}" not found')
        containers = [c["name"] for c in obj.get("spec", {}).get("containers", [])]
        container = q.get("container") or containers[0]
        if container not in containers:
            raise kmock.KubernetesError(status=400, reason="BadRequest", message=f"container {container} is not valid")
        previous = q.get("previous") == "true"
        key = (str(request.name), container, previous)
        if key not in self.lines:
            what = "previous terminated container" if previous else "container"
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"{what} {container} not found / waiting to start"
            )
        lines = self.lines[key]
        if "sinceSeconds" in q:
            lines = [x for x in lines if x[0] >= time.time_ns() - int(q["sinceSeconds"]) * S]
        if "tailLines" in q:
            lines = lines[-int(q["tailLines"]) :] if int(q["tailLines"]) else []
        stamps = q.get("timestamps") == "true"
        body = "".join((f"{rfc3339nano(ts)} " if stamps else "") + text + "\n" for ts, text in lines).encode()
        if "limitBytes" in q:
            body = body[: int(q["limitBytes"])]
        return body


def put_metrics(cluster: Cluster, pod: str, containers: dict[str, dict[str, str]]) -> None:
    obj = {
        "apiVersion": "metrics.k8s.io/v1beta1",
        "kind": "PodMetrics",
        "metadata": {"name": pod, "namespace": NAMESPACE},
        "timestamp": "2026-12-06T10:00:00Z",
        "window": "15s",
        "containers": [{"name": name, "usage": usage} for name, usage in containers.items()],
    }
    cluster.on_loop(lambda: cluster.emu.objects.__setitem__((METRICS, NAMESPACE, pod), obj))


def worker_line(ts_ns: int, level: str, text: str) -> str:
    """A trainer worker record (its own asctime is the container's clock; the kubelet's counts)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts_ns / S)) + f",000 {level} openloops.worker: {text}"


def running_since(role: str, started_ns: int, **kw: Any) -> dict[str, Any]:
    """A Running, Ready pod status whose container started at ``started_ns``."""
    return scheduled(
        role, {"running": {"startedAt": rfc3339nano(started_ns)}}, phase="Running", ready=True, started=True, **kw
    )


@pytest.fixture
def pod_logs(cluster: Cluster) -> PodLogs:
    return PodLogs(cluster)


async def fresh_backend(cluster: Cluster, **kw: Any) -> KubernetesBackend:
    return KubernetesBackend.from_settings(backend_settings(cluster.url, **kw))


def msgs(lines: list[LogLine]) -> list[str]:
    return [x.message for x in lines]


# --- pure parts -----------------------------------------------------------------------------------


def test_quantities() -> None:
    assert parse_quantity("250m") == Decimal("0.25")
    assert parse_quantity("12345678n") == Decimal("0.012345678")
    assert (
        parse_quantity("1") == 1
        and parse_quantity("1.5") == Decimal("1.5")
        and parse_quantity("2u") == Decimal("0.000002")
    )
    assert quantity_bytes("123456Ki") == 123456 * 1024
    assert quantity_bytes("1Gi") == 2**30 and quantity_bytes("1G") == 10**9 and quantity_bytes("1e3") == 1000
    assert quantity_bytes("512M") == 512 * 10**6 and quantity_bytes("0") == 0
    for bad in ("", "lots", "1Zi", None, "1 Gi"):
        assert parse_quantity(bad) is None


def test_usage_sample_from_pod_metrics() -> None:
    pod = {
        "metadata": {"name": "p"},
        "spec": {
            "nodeName": "n1",
            "containers": [{"name": "trainer", "resources": {"limits": {"ephemeral-storage": "10Gi"}}}],
        },
    }
    metrics = {
        "containers": [
            {"name": "trainer", "usage": {"cpu": "1500m", "memory": "1Gi"}},
            {"name": "sidecar", "usage": {"cpu": "12345678n", "memory": "1024Ki"}},
        ]
    }
    s = usage_sample(pod, metrics, "trainer")
    assert (s.replica, s.node, s.memory_bytes, s.ephemeral_bytes, s.ephemeral_capacity_bytes) == (
        "p",
        "n1",
        2**30 + 2**20,
        None,
        10 * 2**30,
    )
    assert s.cpu_cores == pytest.approx(1.512345678)
    none = usage_sample(pod, None, "trainer")
    assert (none.cpu_cores, none.memory_bytes, none.node) == (None, None, "n1")


def test_kubelet_log_text() -> None:
    assert parse_rfc3339_ns("2026-12-06T10:12:17.123456789Z") == 1_796_551_937_123_456_789
    assert parse_rfc3339_ns("2026-12-06T10:12:17Z") == 1_796_551_937 * S
    assert parse_rfc3339_ns("2026-12-06T11:12:17.5+01:00") == 1_796_551_937 * S + S // 2
    text = (
        '2026-12-06T10:12:17.1Z   File "x.py", line 1\n'  # its record was before the window
        "2026-12-06T10:12:18Z INFO 12-06 10:12:18 [api.py:1] Received (request cmpl-1)\n"
        "2026-12-06T10:12:19Z 2026-12-06 10:12:19,000 ERROR openloops.worker: failed request_id=r-9\n"
        "2026-12-06T10:12:19.5Z Traceback (most recent call last):\n"
        "2026-12-06T10:12:19.6Z \n"
        '2026-12-06T10:12:20Z INFO:     10.0.0.1:1 - "GET /health" 200\n'
        "2026-12-06T10:12:21Z partial li"
    )
    parsed = parse_kubelet_log(text, "pod-a", truncated_end=True)
    assert parsed.raw_lines == 6 and parsed.first_record == 1
    assert [(x.timestamp_ns - 1_796_551_937 * S, x.level, x.request_id) for x in parsed.lines] == [
        (S // 10, "INFO", None),
        (1 * S, "INFO", "cmpl-1"),
        (2 * S, "ERROR", "r-9"),
        (2 * S + S // 2, "ERROR", "r-9"),  # a continuation: the kubelet's time, its record's level and id
        (3 * S, "INFO", "r-9"),  # uvicorn's level-only line
    ]
    assert {x.replica for x in parsed.lines} == {"pod-a"}
    assert parse_kubelet_log(text, "p").lines[-1].message == "partial li"


# --- logs ---------------------------------------------------------------------------------------------


async def test_logs_merge_pods_in_time_order(cluster: Cluster, kubelet: Kubelet, pod_logs: PodLogs) -> None:
    b = await fresh_backend(cluster)
    spec = sampler_spec()
    try:
        await b.ensure(spec)
        name = workload_name(spec.workload_id, spec.role)
        a, c = kubelet.create_pod(name, "aaaaa"), kubelet.create_pod(name, "ccccc")
        t0 = (time.time_ns() // S - 600) * S
        for pod in (a, c):
            kubelet.set_status(pod, running_since("sampler", t0 - 60 * S))
        pod_logs.add(a, "sampler", [(t0 + 2 * i * S, worker_line(t0, "INFO", f"a{i}")) for i in range(5)])
        pod_logs.add(c, "sampler", [(t0 + (2 * i + 1) * S, worker_line(t0, "INFO", f"c{i}")) for i in range(5)])
        pod_logs.add(
            c,
            "sampler",
            [
                (t0 + 20 * S, worker_line(t0, "ERROR", "step failed request_id=req-7")),
                (t0 + 20 * S + 1000, "Traceback (most recent call last):"),
                (t0 + 20 * S + 2000, "RuntimeError: CUDA error"),
            ],
        )
        pending = kubelet.create_pod(name, "ppppp")  # not started: its log answers 400, skipped
        await b.close()
        b = await fresh_backend(cluster)  # another process (the API server): no watches, direct reads

        q = LogQuery(t0 - S, time.time_ns(), 4, "desc")
        newest = await b.logs(spec.workload_id, spec.role, q)
        assert msgs(newest) == [
            "RuntimeError: CUDA error",
            "Traceback (most recent call last):",
            "openloops.worker: step failed request_id=req-7",
            "openloops.worker: c4",
        ]
        assert [x.level for x in newest] == ["ERROR", "ERROR", "ERROR", "INFO"]
        assert [x.request_id for x in newest] == ["req-7", "req-7", "req-7", None]
        assert {x.replica for x in newest} == {c}
        assert newest[0].timestamp_ns == t0 + 20 * S + 2000  # the kubelet's own time of each line

        oldest = await b.logs(spec.workload_id, spec.role, LogQuery(t0 + 2 * S, time.time_ns(), 5, "asc"))
        assert msgs(oldest) == [f"openloops.worker: {x}" for x in ("a1", "c1", "a2", "c2", "a3")]
        assert [x.replica for x in oldest] == [a, c, a, c, a]

        window = await b.logs(spec.workload_id, spec.role, LogQuery(t0 + 3 * S, t0 + 5 * S, 100, "asc"))
        assert msgs(window) == ["openloops.worker: c1", "openloops.worker: a2", "openloops.worker: c2"]
        errors = await b.logs(spec.workload_id, spec.role, LogQuery(t0, time.time_ns(), 100, "asc", "ERROR"))
        assert len(errors) == 3 and {x.level for x in errors} == {"ERROR"}

        # what was asked of the kubelet: the role's container, timestamps, a window from the start
        first = [p for p in pod_logs.params if p["pod"] in (a, c)][:2]
        for p in first:
            assert p["container"] == "sampler" and p["timestamps"] == "true" and "previous" not in p
            assert 600 <= int(p["sinceSeconds"]) <= 610 and p["tailLines"] == "256"
        assert any(p["pod"] == pending for p in pod_logs.params)
        assert not b._started
    finally:
        await b.close()


async def test_logs_of_unknown_workload_and_future_window(cluster: Cluster, pod_logs: PodLogs) -> None:
    b = await fresh_backend(cluster)
    try:
        assert await b.logs("nope", WorkloadRole.TRAINER, LogQuery(0, time.time_ns(), 10, "desc")) == []
        later = time.time_ns() + 3600 * S
        assert await b.logs("nope", WorkloadRole.TRAINER, LogQuery(later, later + S, 10, "asc")) == []
    finally:
        await b.close()


async def test_logs_read_more_until_the_limit_is_met(cluster: Cluster, kubelet: Kubelet, pod_logs: PodLogs) -> None:
    b = await fresh_backend(cluster)
    spec = trainer_spec()
    try:
        await b.ensure(spec)
        pod = kubelet.create_pod(workload_name(spec.workload_id, spec.role))
        t0 = (time.time_ns() // S - 3000) * S
        kubelet.set_status(pod, running_since("trainer", t0 - 60 * S))
        lines = [(t0 + i * S // 2, worker_line(t0, "INFO", f"step {i} " + "x" * 60)) for i in range(4000)]
        lines[10] = (lines[10][0], worker_line(t0, "ERROR", "early error"))
        lines[3990] = (lines[3990][0], worker_line(t0, "ERROR", "late error"))
        pod_logs.add(pod, "trainer", lines)
        q_desc = LogQuery(t0, time.time_ns(), 2, "desc", "ERROR")
        assert msgs(await b.logs(spec.workload_id, spec.role, q_desc)) == [
            "openloops.worker: late error",
            "openloops.worker: early error",
        ]
        assert [p["tailLines"] for p in pod_logs.params] == ["256", "1024", "4096"]

        pod_logs.params.clear()
        q_asc = LogQuery(t0, time.time_ns(), 2, "asc", "ERROR")
        assert msgs(await b.logs(spec.workload_id, spec.role, q_asc)) == [
            "openloops.worker: early error",
            "openloops.worker: late error",
        ]
        assert [p["limitBytes"] for p in pod_logs.params] == [str(256 * 1024), str(1024 * 1024)]

        pod_logs.params.clear()  # enough in the first read: one request
        got = await b.logs(spec.workload_id, spec.role, LogQuery(t0, time.time_ns(), 3, "desc"))
        assert msgs(got) == [f"openloops.worker: step {i} " + "x" * 60 for i in (3999, 3998, 3997)]
        assert len(pod_logs.params) == 1
    finally:
        await b.close()


async def test_logs_never_guess_the_level_of_a_cut_record(
    cluster: Cluster, kubelet: Kubelet, pod_logs: PodLogs
) -> None:
    """A traceback longer than the first tail: its lines are not read as INFO orphans, the
    backend reads further back until it has their record."""
    b = await fresh_backend(cluster)
    spec = trainer_spec()
    try:
        await b.ensure(spec)
        pod = kubelet.create_pod(workload_name(spec.workload_id, spec.role))
        t0 = (time.time_ns() // S - 100) * S
        kubelet.set_status(pod, running_since("trainer", t0 - S))
        pod_logs.add(
            pod,
            "trainer",
            [(t0, worker_line(t0, "INFO", "fine")), (t0 + S, worker_line(t0, "ERROR", "crashed request_id=r1"))],
        )
        pod_logs.add(pod, "trainer", [(t0 + S + i, f'  File "deep.py", line {i}') for i in range(300)])
        got = await b.logs(spec.workload_id, spec.role, LogQuery(t0, time.time_ns(), 1000, "desc", "ERROR"))
        assert len(got) == 301 and got[-1].message == "openloops.worker: crashed request_id=r1"
        assert {(x.level, x.request_id) for x in got} == {("ERROR", "r1")}
        assert [p["tailLines"] for p in pod_logs.params] == ["256", "1024"]
    finally:
        await b.close()


async def test_logs_include_the_previous_container_after_a_restart(
    cluster: Cluster, kubelet: Kubelet, pod_logs: PodLogs
) -> None:
    b = await fresh_backend(cluster)
    spec = trainer_spec()
    try:
        await b.ensure(spec)
        pod = kubelet.create_pod(workload_name(spec.workload_id, spec.role))
        t0 = (time.time_ns() // S - 120) * S
        crashed = {
            "terminated": {
                "exitCode": 137,
                "reason": "OOMKilled",
                "startedAt": rfc3339nano(t0),
                "finishedAt": rfc3339nano(t0 + 10 * S),
            }
        }
        kubelet.set_status(pod, running_since("trainer", t0 + 15 * S, restarts=1, last=crashed))
        pod_logs.add(
            pod,
            "trainer",
            [(t0 + S, worker_line(t0, "INFO", "loading")), (t0 + 9 * S, worker_line(t0, "CRITICAL", "out of memory"))],
            previous=True,
        )
        pod_logs.add(pod, "trainer", [(t0 + 20 * S, worker_line(t0, "INFO", "restarted"))])
        got = await b.logs(spec.workload_id, spec.role, LogQuery(t0, time.time_ns(), 10, "asc"))
        assert msgs(got) == [
            "openloops.worker: loading",
            "openloops.worker: out of memory",
            "openloops.worker: restarted",
        ]
        assert {p.get("previous") for p in pod_logs.params} == {None, "true"}
        # a window after the crash does not read the previous container
        pod_logs.params.clear()
        got = await b.logs(spec.workload_id, spec.role, LogQuery(t0 + 15 * S, time.time_ns(), 10, "asc"))
        assert msgs(got) == ["openloops.worker: restarted"]
        assert [p.get("previous") for p in pod_logs.params] == [None]
    finally:
        await b.close()


# --- usage ----------------------------------------------------------------------------------------------


async def test_usage_from_pod_metrics(cluster: Cluster, kubelet: Kubelet) -> None:
    b = await fresh_backend(cluster)
    spec = sampler_spec()
    try:
        await b.ensure(spec)
        name = workload_name(spec.workload_id, spec.role)
        a, c = kubelet.create_pod(name, "aaaaa"), kubelet.create_pod(name, "ccccc")
        for pod, node in ((a, "gpu-1"), (c, "gpu-2")):
            kubelet.set_status(pod, running("sampler", ready=True, started=True))
            cluster.core.patch_namespaced_pod(pod, NAMESPACE, {"spec": {"nodeName": node}})
        kubelet.create_pod(name, "ppppp")  # Pending: no sample
        put_metrics(cluster, a, {"sampler": {"cpu": "250m", "memory": "123456Ki"}})  # c: not scraped yet (404)
        await b.close()
        b = await fresh_backend(cluster)  # another process: no watches, direct reads

        samples = sorted(await b.usage(spec.workload_id, spec.role), key=lambda s: s.replica)
        assert [(s.replica, s.node, s.cpu_cores, s.memory_bytes, s.ephemeral_bytes) for s in samples] == [
            (a, "gpu-1", 0.25, 123456 * 1024, None),
            (c, "gpu-2", None, None, None),
        ]
        assert await b.usage("nope", spec.role) == []
        assert not b._started
    finally:
        await b.close()


async def test_usage_without_metrics_server(cluster: Cluster, kubelet: Kubelet) -> None:
    """No metrics.k8s.io at all (404), or its APIService down (503): unknown, not an error."""
    b = await fresh_backend(cluster)
    spec = trainer_spec()
    try:
        await b.ensure(spec)
        pod = kubelet.create_pod(workload_name(spec.workload_id, spec.role))
        kubelet.set_status(pod, running("trainer", ready=True, started=True))
        (s,) = await b.usage(spec.workload_id, spec.role)
        assert (s.replica, s.cpu_cores, s.memory_bytes) == (pod, None, None)

        def unavailable(request: kmock.Request) -> None:
            raise kmock.KubernetesError(
                status=503, reason="ServiceUnavailable", message="the server is currently unable to handle the request"
            )

        cluster.on_loop(lambda: cluster.emu[METRICS] << unavailable)
        before = len(cluster.requests())
        (s,) = await b.usage(spec.workload_id, spec.role)
        assert (s.cpu_cores, s.memory_bytes) == (None, None)
        assert sum(1 for r in cluster.requests()[before:] if r.resource == METRICS) == 1  # not retried
    finally:
        await b.close()


async def test_unreachable_api_server_is_transient() -> None:
    b = KubernetesBackend.from_settings(
        backend_settings("http://127.0.0.1:9", api_retry_attempts=2, api_timeout_seconds=1)
    )
    try:
        with pytest.raises(KubernetesUnavailableError) as err:
            await b.logs("x", WorkloadRole.TRAINER, LogQuery(0, time.time_ns(), 10, "desc"))
        assert isinstance(err.value, TransientBackendError)
        with pytest.raises(TransientBackendError):
            await b.usage("x", WorkloadRole.TRAINER)
    finally:
        await b.close()
