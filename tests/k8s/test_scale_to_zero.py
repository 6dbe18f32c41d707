"""Scale to zero and wake-up with the Kubernetes backend (kmock), a running controller and the
request path's ``touch_and_wake``: idle -> SCALED_TO_ZERO (the Kubernetes Deployment at replicas 0) -> request
-> WAKING_UP -> ACTIVE, and the waiting request then proceeds.

``ReplicaSetPlayer`` plays the cluster (pods follow ``spec.replicas``); nothing of ours is
patched."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from control_plane.api.errors import STATUS_BY_ERROR
from control_plane.db.models import Sampler, ServedModel
from control_plane.errors import Unavailable
from control_plane.runtime import Runtime
from control_plane.scaling.activity import flush_activity
from control_plane.scaling.wake import WakeTimeout, touch_and_wake
from control_plane.scheduler.k8s_manifests import LABEL_WORKLOAD, workload_name
from control_plane.scheduler.protocol import WorkloadRole
from control_plane.services import samplers as samplers_svc
from control_plane.services.samplers import sampler_workload_id
from tests.control_plane.conftest import TEST_MODEL, Tenant
from tests.k8s.conftest import DEPLOYMENTS, PODS, Cluster, ReplicaSetPlayer, eventually
from tests.k8s.controller_env import history, k8s_runtime, k8s_settings, new_served_model, row, start, status, tenant

pytestmark = pytest.mark.usefixtures("clean_state")
T = 30.0  # deadline for anything the controller does (generous: slow, shared CI machines)


def pods_of(cluster: Cluster, name: str) -> list[str]:
    return [p for p, obj in cluster.objects(PODS).items() if obj["metadata"]["labels"].get(LABEL_WORKLOAD) == name]


def replicas(cluster: Cluster, name: str) -> int | None:
    dep = cluster.get(DEPLOYMENTS, name)
    return None if dep is None else int(dep["spec"]["replicas"])


async def set_delay(rt: Runtime, model: Any, rid: str, seconds: int) -> None:
    async with rt.db.transaction() as s:
        await s.execute(update(model).where(model.id == rid).values(scale_down_delay_seconds=seconds))


async def wait_status(rt: Runtime, model: Any, rid: str, want: str, timeout: float = T) -> None:
    async def check() -> bool:
        return await status(rt, model, rid) == want

    await eventually(check, timeout, what=f"{model.__name__} {rid} {want}")


async def new_idle_sampler(rt: Runtime, t: Tenant) -> Sampler:
    """A standalone sampler of TEST_MODEL that scales to zero after one idle second."""
    async with rt.db.transaction() as s:
        smp = await samplers_svc.create_sampler(
            s, t.principal, rt.catalog, samplers_svc.SamplerRequest(session_id=None, base_model=TEST_MODEL)
        )
        smp.scale_down_delay_seconds = 1
    return smp


async def test_idle_served_model_scales_to_zero_and_a_request_wakes_it(
    services, data_dir: Path, cluster: Cluster
) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        dep = await new_served_model(rt, await tenant(rt), scale_down_delay_seconds=1)
        name = workload_name(dep.id, WorkloadRole.SERVED_MODEL)
        with ReplicaSetPlayer(cluster):
            ctl = start(rt)
            try:
                await wait_status(rt, ServedModel, dep.id, "ACTIVE")
                uid = cluster.get(DEPLOYMENTS, name)["metadata"]["uid"]
                await wait_status(rt, ServedModel, dep.id, "SCALED_TO_ZERO")  # nobody used it for 1 s
                await eventually(lambda: replicas(cluster, name) == 0, T, what="replicas 0")
                await eventually(lambda: not pods_of(cluster, name), T, what="its pods gone")
                await set_delay(rt, ServedModel, dep.id, 3600)  # once awake, stay awake for the asserts

                request = asyncio.create_task(touch_and_wake(rt, "served_model", dep.id))
                await eventually(lambda: replicas(cluster, name) == 1, T, what="scaled back to 1")
                await asyncio.wait_for(request, T)  # the request waited, then proceeds
                assert await status(rt, ServedModel, dep.id) == "ACTIVE"
            finally:
                await ctl.halt()
        hist = await history(rt, dep.id)
        tail = [(h[0], h[1]) for h in hist[-3:]]
        assert tail == [("ACTIVE", "SCALED_TO_ZERO"), ("SCALED_TO_ZERO", "WAKING_UP"), ("WAKING_UP", "ACTIVE")]
        assert re.fullmatch(r"idle for \d+s \(scale_down_delay_seconds=1\)", hist[-3][2])
        assert hist[-2][2] == "woken by a request" and hist[-1][2] == "woke up"
        assert cluster.get(DEPLOYMENTS, name)["metadata"]["uid"] == uid  # scaled, never recreated


async def test_requests_keep_it_awake_and_record_activity(services, data_dir: Path, cluster: Cluster) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        dep = await new_served_model(rt, await tenant(rt), scale_down_delay_seconds=3)
        with ReplicaSetPlayer(cluster):
            ctl = start(rt)
            try:
                await wait_status(rt, ServedModel, dep.id, "ACTIVE")
                passes = ctl.controller.passes
                loop = asyncio.get_running_loop()
                end = loop.time() + 5  # well over a delay's worth of traffic, a request every 0.2 s
                while loop.time() < end:
                    await touch_and_wake(rt, "served_model", dep.id)  # awake: returns at once
                    await asyncio.sleep(0.2)
                assert ctl.controller.passes > passes + 5  # the controller was looking meanwhile
                assert "SCALED_TO_ZERO" not in [h[1] for h in await history(rt, dep.id)]
                last = (await row(rt, ServedModel, dep.id)).last_request_at
                assert last is not None  # flushed from Redis by the controller
            finally:
                await ctl.halt()


async def test_a_wake_that_takes_too_long_is_a_503_and_a_later_request_succeeds(
    services, data_dir: Path, cluster: Cluster
) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        dep = await new_served_model(rt, await tenant(rt), scale_down_delay_seconds=1)
        with ReplicaSetPlayer(cluster) as player:
            ctl = start(rt)
            try:
                await wait_status(rt, ServedModel, dep.id, "SCALED_TO_ZERO")
                await set_delay(rt, ServedModel, dep.id, 3600)
                player.ready = False  # the new pod will not become ready (e.g. still pulling)
                with pytest.raises(WakeTimeout) as err:
                    await touch_and_wake(rt, "served_model", dep.id, timeout_s=0.5)
                assert STATUS_BY_ERROR[Unavailable] == 503 and isinstance(err.value, Unavailable)
                assert err.value.code == "waking_up" and "still waking up" in err.value.message
                assert await status(rt, ServedModel, dep.id) == "WAKING_UP"  # not failed: still coming
                player.ready = True
                await asyncio.wait_for(touch_and_wake(rt, "served_model", dep.id), T)
                assert await status(rt, ServedModel, dep.id) == "ACTIVE"
            finally:
                await ctl.halt()


async def test_shared_sampler_scales_to_zero_when_all_its_rows_sleep(
    services, data_dir: Path, cluster: Cluster
) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        t = await tenant(rt)
        smp = await new_idle_sampler(rt, t)
        name = workload_name(sampler_workload_id(TEST_MODEL), WorkloadRole.SAMPLER)
        with ReplicaSetPlayer(cluster):
            ctl = start(rt)
            try:
                await wait_status(rt, Sampler, smp.id, "ACTIVE")
                assert (await row(rt, Sampler, smp.id)).endpoint.startswith("http://")
                await wait_status(rt, Sampler, smp.id, "SCALED_TO_ZERO")
                await eventually(lambda: replicas(cluster, name) == 0, T, what="shared sampler at 0 replicas")
                await set_delay(rt, Sampler, smp.id, 3600)
                await asyncio.wait_for(touch_and_wake(rt, "sampler", smp.id), T)
                assert await status(rt, Sampler, smp.id) == "ACTIVE"
                assert replicas(cluster, name) == 1
            finally:
                await ctl.halt()
        tail = [h[1] for h in (await history(rt, smp.id))[-3:]]
        assert tail == ["SCALED_TO_ZERO", "WAKING_UP", "ACTIVE"]


async def test_touch_records_activity_without_writing_postgres(services, data_dir: Path, cluster: Cluster) -> None:
    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        dep = await new_served_model(rt, await tenant(rt))
        await touch_and_wake(rt, "served_model", dep.id)  # DEPLOYING: not asleep, returns at once
        assert (await row(rt, ServedModel, dep.id)).last_request_at is None
        assert await flush_activity(rt.db, rt.redis) == 1
        assert (await row(rt, ServedModel, dep.id)).last_request_at is not None
        with pytest.raises(Exception) as err:
            await touch_and_wake(rt, "served_model", "sm-missing")
        assert type(err.value).__name__ == "NotFound"
        with pytest.raises(ValueError):
            await touch_and_wake(rt, "checkpoint", dep.id)  # type: ignore[arg-type]


async def test_the_loops_sampler_route_wakes_its_sampler(services, data_dir: Path, cluster: Cluster) -> None:
    import httpx

    from control_plane.api.app import create_app
    from control_plane.sampling.dispatcher import dispatcher_for

    async with k8s_runtime(k8s_settings(services, data_dir, cluster.url)) as rt:
        t = await tenant(rt)
        smp = await new_idle_sampler(rt, t)
        transport = httpx.ASGITransport(app=create_app(rt))
        with ReplicaSetPlayer(cluster):
            ctl = start(rt)
            try:
                await wait_status(rt, Sampler, smp.id, "SCALED_TO_ZERO")
                await set_delay(rt, Sampler, smp.id, 3600)
                async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=t.headers) as c:
                    other = await tenant(rt, "other-org")
                    r = await c.post(
                        f"/v1/loops/samplers/{smp.id}/sync/v1/completions",
                        json={"prompt": "hi", "max_tokens": 1},
                        headers=other.headers,
                    )
                    assert r.status_code == 404  # another org's sampler is neither found nor woken
                    assert await status(rt, Sampler, smp.id) == "SCALED_TO_ZERO"
                    r = await c.post(
                        f"/v1/loops/samplers/{smp.id}/sync/v1/completions", json={"prompt": "hi", "max_tokens": 1}
                    )
                # the request waited for the wake-up and was then forwarded to the (emulated,
                # unreachable) vLLM Service: not refused as "not ACTIVE"
                assert await status(rt, Sampler, smp.id) == "ACTIVE"
                assert "retry when it is ACTIVE" not in r.text, r.text
                assert [h[1] for h in (await history(rt, smp.id))[-2:]] == ["WAKING_UP", "ACTIVE"]
            finally:
                await ctl.halt()
                await dispatcher_for(rt).aclose()
