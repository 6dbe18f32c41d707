"""GPU capacity per org: GET/PATCH /v1/training/capacity, 429 loops_capacity on every route
that starts a workload (Loops and Tinker), capacity freed by deactivation and scale to zero,
concurrent creates against a ceiling, waking against a ceiling, isolation between orgs, and
the operator commands. The test catalog's models have no GPUs: each trainer rank and each
sampler server counts one ``cpu`` unit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from control_plane.api.app import create_app
from control_plane.cli import admin_capacity
from control_plane.controller.lifecycle import RowReconciler
from control_plane.controller.retry import BackendRetry
from control_plane.db.models import Checkpoint, Deployment, Run, Sampler
from control_plane.errors import CapacityExceeded
from control_plane.runtime import build_runtime
from control_plane.scaling.kinds import DEPLOYMENT
from control_plane.scaling.wake import request_wake
from control_plane.statuses import Status
from control_plane.training.completions import CompletionConsumer
from control_plane.training.inflight import inflight_key
from control_plane.training.queue import read_future
from data_plane.wire import queue as q
from tests.control_plane.conftest import ALL, OTHER_MODEL, TEST_MODEL, Api, Tenant, make_settings
from tests.control_plane.seed import add_checkpoint
from tests.infra.services import TestServices

CapiFactory = Callable[..., Any]


@pytest.fixture
def capi(clean_state: None, services: TestServices, data_dir: Path) -> CapiFactory:
    """An in-process API with settings overrides (``async with capi(...) as api``)."""

    @asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Api]:
        runtime = build_runtime(make_settings(services, data_dir, **overrides), with_backend=False)
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Api(runtime, client)
        await runtime.close()

    return make


async def _loops_session(api: Api, t: Tenant) -> str:
    res = await api.client.post("/v1/loops/sessions", json={}, headers=t.headers)
    assert res.status_code == 200, res.text
    return str(res.json()["session"]["id"])


async def _tinker_session(api: Api, t: Tenant) -> str:
    res = await api.client.post(
        "/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"}, headers=t.headers
    )
    assert res.status_code == 200, res.text
    return str(res.json()["session_id"])


async def _trainer(api: Api, t: Tenant, sid: str) -> httpx.Response:
    return await api.client.post(
        "/v1/loops/trainers", json={"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 8}, headers=t.headers
    )


def _capacity_refusal(res: httpx.Response) -> None:
    assert res.status_code == 429, res.text
    body = res.json()
    assert body["details"] == {"reason": "loops_capacity"}
    assert body["code"] == "capacity_exceeded" and "ceiling" in body["detail"]
    assert float(res.headers["Retry-After"]) >= 1


async def _cpu(api: Api, t: Tenant) -> dict[str, Any]:
    res = await api.client.get("/v1/training/capacity", headers=t.headers)
    assert res.status_code == 200, res.text
    return next(x for x in res.json()["gpu_capacities"] if x["gpu_type"] == "cpu")


async def test_get_capacity_counts_live_workloads(capi: CapiFactory) -> None:
    async with capi(capacity_default_max_gpus={"cpu": 5}, trainer_ranks=2) as api:
        t = await api.tenant("acme")
        assert await _cpu(api, t) == {
            "gpu_type": "cpu",
            "baseline": 5,
            "limit": 5,
            "usage_count": 0,
            "dedicated_usage_count": 0,
            "spot_usage_count": 0,
        }
        sid = await _loops_session(api, t)
        assert (await _trainer(api, t, sid)).status_code == 200  # 2 ranks: 2 units
        spot = await api.client.post(
            "/v1/loops/trainers",
            json={"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 8, "availability_model": "spot"},
            headers=t.headers,
        )
        assert spot.status_code == 200
        got = await _cpu(api, t)
        assert (got["usage_count"], got["dedicated_usage_count"], got["spot_usage_count"]) == (4, 2, 2)
        # two samplers of one base model share one server: one unit
        for _ in range(2):
            res = await api.client.post(
                "/v1/loops/samplers", json={"session_id": sid, "base_model": TEST_MODEL}, headers=t.headers
            )
            assert res.status_code == 200, res.text
        assert (await _cpu(api, t))["usage_count"] == 5


async def test_ceiling_refuses_every_create_route(capi: CapiFactory) -> None:
    async with capi(capacity_default_max_gpus={"cpu": 1}) as api:
        t = await api.tenant("acme")
        sid = await _loops_session(api, t)
        first = await _trainer(api, t, sid)
        assert first.status_code == 200, first.text
        ckpt = await add_checkpoint(api.runtime, t, first.json()["run"]["id"], "snap")
        tsid = await _tinker_session(api, t)
        refused = {
            "loops runs": ("/v1/loops/runs", {"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 8}),
            "loops trainers": ("/v1/loops/trainers", {"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 8}),
            "loops samplers": ("/v1/loops/samplers", {"session_id": sid, "base_model": TEST_MODEL}),
            "served model": ("/v1/loops/checkpoints/deploy", {"checkpoint_ids": [ckpt.id], "model_name": "m"}),
            "legacy trainer": (f"/v1/trainer_sessions/{sid}/trainers", {"model": TEST_MODEL, "lora_rank": 8}),
            "legacy sampler": (f"/v1/trainer_sessions/{sid}/samplers", {"model": TEST_MODEL}),
            "tinker create_model": (
                "/api/v1/create_model",
                {"session_id": tsid, "model_seq_id": 0, "base_model": TEST_MODEL},
            ),
            "tinker sampling session": (
                "/api/v1/create_sampling_session",
                {"session_id": tsid, "sampling_session_seq_id": 0, "base_model": TEST_MODEL},
            ),
        }
        for name, (path, body) in refused.items():
            res = await api.client.post(path, json=body, headers=t.headers)
            assert res.status_code == 429, (name, res.text)
            _capacity_refusal(res)
        # nothing of the refused creates was written
        async with api.runtime.db.session() as s:
            assert len((await s.execute(select(Run))).scalars().all()) == 1
            assert (await s.execute(select(Sampler))).scalars().all() == []
        # a run that reuses the warm deployment adds nothing: it is admitted
        reuse = await api.client.post(
            "/v1/loops/trainers",
            json={
                "session_id": sid,
                "base_model": TEST_MODEL,
                "lora_rank": 8,
                "reuse_from_run_id": first.json()["run"]["id"],
            },
            headers=t.headers,
        )
        assert reuse.status_code == 200, reuse.text
        assert reuse.json()["run"]["deployment_id"] == first.json()["run"]["deployment_id"]


async def test_deactivate_and_scale_to_zero_free_capacity(capi: CapiFactory) -> None:
    async with capi(capacity_default_max_gpus={"cpu": 1}) as api:
        t = await api.tenant("acme")
        sid = await _loops_session(api, t)
        run = (await _trainer(api, t, sid)).json()["run"]
        _capacity_refusal(await _trainer(api, t, sid))
        deact = await api.client.post(f"/v1/loops/runs/{run['id']}/deactivate", headers=t.headers)
        assert deact.status_code == 200
        second = await _trainer(api, t, sid)
        assert second.status_code == 200, second.text
        _capacity_refusal(await _trainer(api, t, sid))
        # the second trainer scales to zero (what the controller does when it is idle)
        dep_id = second.json()["run"]["deployment_id"]
        async with api.runtime.db.transaction() as s:
            await s.execute(
                update(Deployment).where(Deployment.id == dep_id).values(status=Status.SCALED_TO_ZERO.value)
            )
        assert (await _cpu(api, t))["usage_count"] == 0
        third = await _trainer(api, t, sid)
        assert third.status_code == 200, third.text
        # now the sleeping one cannot wake: the org is at its ceiling again
        with pytest.raises(CapacityExceeded):
            await request_wake(api.runtime, "deployment", dep_id, strict=True)
        assert await request_wake(api.runtime, "deployment", dep_id) == Status.SCALED_TO_ZERO  # waits
        async with api.runtime.db.session() as s:
            dep = await s.get(Deployment, dep_id)
        assert dep is not None and dep.status == Status.SCALED_TO_ZERO.value
        assert dep.status_reason is not None and dep.status_reason.startswith("waiting for capacity")
        # once the third is gone, the sleeping one wakes
        deact = await api.client.post(f"/v1/loops/runs/{third.json()['run']['id']}/deactivate", headers=t.headers)
        assert deact.status_code == 200
        await request_wake(api.runtime, "deployment", dep_id, strict=True)
        async with api.runtime.db.session() as s:
            dep = await s.get(Deployment, dep_id)
        assert dep is not None and dep.status == Status.WAKING_UP.value


async def test_concurrent_creates_never_pass_the_ceiling(capi: CapiFactory) -> None:
    async with capi(capacity_default_max_gpus={"cpu": 3}, db_pool_size=10, db_max_overflow=20) as api:
        t = await api.tenant("acme")
        sid = await _loops_session(api, t)
        results = await asyncio.gather(*(_trainer(api, t, sid) for _ in range(20)))
        codes = sorted(r.status_code for r in results)
        assert codes == [200] * 3 + [429] * 17, [r.text for r in results if r.status_code not in (200, 429)]
        for r in results:
            if r.status_code == 429:
                _capacity_refusal(r)
        async with api.runtime.db.session() as s:
            live = (await s.execute(select(Deployment).where(Deployment.org_id == t.org_id))).scalars().all()
        assert len(live) == 3
        assert (await _cpu(api, t))["usage_count"] == 3


async def test_capacity_is_per_org(capi: CapiFactory) -> None:
    async with capi(capacity_default_max_gpus={"cpu": 1}) as api:
        a = await api.tenant("acme")
        b = await api.tenant("bravo")
        sa, sb = await _loops_session(api, a), await _loops_session(api, b)
        assert (await _trainer(api, a, sa)).status_code == 200
        _capacity_refusal(await _trainer(api, a, sa))
        assert (await _cpu(api, b))["usage_count"] == 0
        assert (await _trainer(api, b, sb)).status_code == 200  # bravo has its own ceiling
        assert (await _cpu(api, a))["usage_count"] == 1 and (await _cpu(api, b))["usage_count"] == 1
        # an operator raises acme's ceiling only
        row = await admin_capacity.set_limit(api.runtime.db, api.runtime.settings, "acme", "cpu", 2)
        assert (row["limit"], row["operator_limit"], row["usage_count"]) == (2, 2, 1)
        assert (await _trainer(api, a, sa)).status_code == 200
        _capacity_refusal(await _trainer(api, b, sb))
        shown = await admin_capacity.show(api.runtime.db, api.runtime.settings, "bravo")
        assert next(x for x in shown if x["gpu_type"] == "cpu")["limit"] == 1
        # back to the default
        row = await admin_capacity.set_limit(api.runtime.db, api.runtime.settings, "acme", "cpu", None)
        assert row["limit"] == 1


async def test_patch_capacity(capi: CapiFactory) -> None:
    async with capi(capacity_default_max_gpus={"cpu": 4}) as api:
        admin = await api.tenant("acme", scopes=ALL, email="admin@acme.io")
        member = await api.tenant("acme")
        body = {"gpu_type": "cpu", "max_gpus": 1}
        denied = await api.client.patch("/v1/training/capacity", json=body, headers=member.headers)
        assert denied.status_code == 403
        res = await api.client.patch("/v1/training/capacity", json=body, headers=admin.headers)
        assert res.status_code == 200, res.text
        assert res.json()["gpu_capacity"]["limit"] == 1
        assert (await _cpu(api, member))["limit"] == 1
        sid = await _loops_session(api, member)
        assert (await _trainer(api, member, sid)).status_code == 200
        _capacity_refusal(await _trainer(api, member, sid))
        for bad, field in (
            ({"gpu_type": "cpu", "max_gpus": 5}, "max_gpus"),  # above the operator's 4
            ({"gpu_type": "H200", "max_gpus": 1}, "gpu_type"),  # not a type of this server
            ({"gpu_type": "cpu", "max_gpus": -1}, "max_gpus"),
            ({"gpu_type": "cpu", "max_gpus": 1, "team_id": "t1"}, "team_id"),
        ):
            res = await api.client.patch("/v1/training/capacity", json=bad, headers=admin.headers)
            assert res.status_code == 400 and res.json()["field"] == field, res.text
        # the org may raise its own ceiling back up to the operator's
        res = await api.client.patch(
            "/v1/training/capacity", json={"gpu_type": "cpu", "max_gpus": 4}, headers=admin.headers
        )
        assert res.status_code == 200 and res.json()["gpu_capacity"]["limit"] == 4
        assert (await _trainer(api, member, sid)).status_code == 200


async def test_no_ceiling_by_default(api: Api) -> None:
    t = await api.tenant("acme")
    got = await _cpu(api, t)
    assert got["limit"] == -1 and got["baseline"] == 0
    sid = await _loops_session(api, t)
    for _ in range(3):
        assert (await _trainer(api, t, sid)).status_code == 200
    # a model without a sampler role still counts its trainer
    res = await api.client.post(
        "/v1/loops/trainers", json={"session_id": sid, "base_model": OTHER_MODEL, "lora_rank": 8}, headers=t.headers
    )
    assert res.status_code == 200
    assert (await _cpu(api, t))["usage_count"] == 4


async def test_the_controller_wakes_a_trainer_with_waiting_ops_once_capacity_frees(
    capi: CapiFactory, services: TestServices, data_dir: Path
) -> None:
    """An op that reached a scaled-to-zero trainer while the org is at its ceiling waits in the
    run's log; the controller keeps the trainer asleep (saying why) until capacity frees, then
    wakes it on its next pass."""
    async with capi(capacity_default_max_gpus={"cpu": 1}) as api:
        t = await api.tenant("acme")
        sid = await _loops_session(api, t)
        sleeping = (await _trainer(api, t, sid)).json()["run"]
        dep_id = sleeping["deployment_id"]
        async with api.runtime.db.transaction() as s:
            await s.execute(
                update(Deployment).where(Deployment.id == dep_id).values(status=Status.SCALED_TO_ZERO.value)
            )
        other = await _trainer(api, t, sid)  # takes the org's one unit
        assert other.status_code == 200, other.text
        await api.runtime.redis.sadd(q.run_pending_key(sleeping["id"]), "req-waiting")

        # the controller's pass, with a backend (local processes; nothing is started here)
        runtime = build_runtime(make_settings(services, data_dir, capacity_default_max_gpus={"cpu": 1}))
        try:
            rows = RowReconciler(runtime, BackendRetry(attempts=3, max_seconds=60, base_delay=1, max_delay=5))

            async def status() -> tuple[str, str | None]:
                async with runtime.db.session() as s:
                    dep = await s.get(Deployment, dep_id)
                    assert dep is not None
                    return dep.status, dep.status_reason

            await rows.reconcile(DEPLOYMENT, dep_id)
            st, reason = await status()
            assert st == Status.SCALED_TO_ZERO.value
            assert reason is not None and reason.startswith("waiting for capacity to wake up"), reason
            # the other trainer ends: the next pass wakes the sleeping one for its waiting op
            deact = await api.client.post(f"/v1/loops/runs/{other.json()['run']['id']}/deactivate", headers=t.headers)
            assert deact.status_code == 200
            await rows.reconcile(DEPLOYMENT, dep_id)
            st, reason = await status()
            assert st == Status.WAKING_UP.value and reason == f"woken by an op waiting on run {sleeping['id']}"
        finally:
            await runtime.close()


async def test_sampling_a_sleeping_sampler_at_the_ceiling_is_refused_before_a_future_exists(
    capi: CapiFactory,
) -> None:
    async with capi(capacity_default_max_gpus={"cpu": 1}) as api:
        t = await api.tenant("acme")
        tsid = await _tinker_session(api, t)
        res = await api.client.post(
            "/api/v1/create_sampling_session",
            json={"session_id": tsid, "sampling_session_seq_id": 0, "base_model": TEST_MODEL},
            headers=t.headers,
        )
        assert res.status_code == 200, res.text
        smp_id = res.json()["sampling_session_id"]
        async with api.runtime.db.transaction() as s:
            await s.execute(update(Sampler).where(Sampler.id == smp_id).values(status=Status.SCALED_TO_ZERO.value))
        sid = await _loops_session(api, t)
        assert (await _trainer(api, t, sid)).status_code == 200  # the org's one unit
        body = {"sampling_session_id": smp_id, "prompt": {"chunks": [{"tokens": [1, 2, 3]}]}, "num_samples": 1}
        body["sampling_params"] = {"max_tokens": 4}
        futures = set(await api.runtime.redis.keys("*future*"))  # the trainer's init op
        inflight = await api.runtime.redis.zcard(inflight_key(t.org_id))
        res = await api.client.post("/api/v1/asample", json=body, headers=t.headers)
        _capacity_refusal(res)  # the tinker SDK backs off and retries this
        # no future was created: nothing more in flight for the org, no new future
        assert await api.runtime.redis.zcard(inflight_key(t.org_id)) == inflight
        assert set(await api.runtime.redis.keys("*future*")) == futures
        async with api.runtime.db.session() as s:
            smp = await s.get(Sampler, smp_id)
        assert smp is not None and smp.status == Status.SCALED_TO_ZERO.value


async def test_a_sampling_session_a_save_opens_past_the_ceiling_starts_asleep(capi: CapiFactory) -> None:
    """save_weights_and_get_sampling_client at the ceiling: the save succeeds and its sampling
    session opens, scaled to zero and saying why (its requests get 429 until capacity frees)
    instead of starting another sampler server past the ceiling."""
    async with capi(capacity_default_max_gpus={"cpu": 1}) as api:
        t = await api.tenant("acme")
        run = (await _trainer(api, t, await _loops_session(api, t))).json()["run"]  # the one unit
        consumer = CompletionConsumer(api.runtime)

        async def save(seq: int) -> Sampler:
            rid = f"req-save-{seq}"
            await consumer.handle(
                q.Completion(
                    request_id=rid,
                    run_id=run["id"],
                    kind=q.OpKind.SAVE_WEIGHTS_FOR_SAMPLER,
                    checkpoint_kind="sampler_weights",
                    storage_prefix=f"ckpt/acme/{seq}",
                    sampling_session_seq_id=seq,
                )
            )
            got = await read_future(api.runtime.redis, rid)
            assert got is not None and got.state == q.FutureState.DONE, got
            async with api.runtime.db.session() as s:
                smp = await s.get(Sampler, json.loads(got.body)["sampling_session_id"])
            assert smp is not None
            return smp

        asleep = await save(0)
        assert asleep.status == Status.SCALED_TO_ZERO.value
        assert asleep.status_reason is not None and asleep.status_reason.startswith("waiting for capacity to wake up")
        assert (await _cpu(api, t))["usage_count"] == 1
        # with room for a sampler server, the next one starts as usual
        await admin_capacity.set_limit(api.runtime.db, api.runtime.settings, "acme", "cpu", 2)
        assert (await save(1)).status == Status.DEPLOYING.value
        async with api.runtime.db.session() as s:
            saved = (await s.execute(select(Checkpoint).where(Checkpoint.run_id == run["id"]))).scalars().all()
        assert len(saved) == 2  # both saves were recorded
