"""open_sampling_session against real Postgres: one row per id, idempotent, pinned checkpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, select

from control_plane.db.models import Run, StatusHistory
from control_plane.errors import Conflict
from control_plane.runtime import build_runtime
from control_plane.services import sessions as sessions_svc
from control_plane.services.checkpoints import record_checkpoint
from control_plane.services.sampling_sessions import open_sampling_session
from tests.control_plane.conftest import TEST_MODEL, make_settings, make_tenant
from tests.infra.services import TestServices


@pytest.fixture
async def runtime(clean_state: None, services: TestServices, data_dir: Path):
    r = build_runtime(make_settings(services, data_dir), with_backend=False)
    yield r
    await r.close()


async def _setup(r):
    t = await make_tenant(r, "org-a")
    async with r.db.transaction() as s:
        sess = await sessions_svc.create_session(s, t.principal, origin="tinker")
        run = Run(
            id=f"{sess.id}:train:0",
            org_id=t.org_id,
            created_by=t.user_id,
            session_id=sess.id,
            origin="tinker",
            name="r",
            base_model=TEST_MODEL,
            status="ACTIVE",
            lora_rank=8,
            max_seq_len=512,
            scale_down_delay_seconds=3600,
        )
        s.add(run)
        await s.flush()
        ckpt = await record_checkpoint(
            s,
            run,
            kind="sampler_weights",
            name="s1",
            storage_prefix=f"ckpt/{run.id}/sampler_weights/s1",
            files=[("adapter_config.json", 10)],
            lora_config={"rank": 8},
        )
    return t, sess.id, ckpt


async def test_open_is_idempotent_and_pins_the_checkpoint(runtime):
    t, sid, ckpt = await _setup(runtime)
    kw = dict(org_id=t.org_id, created_by=t.user_id, session_id=sid, base_model=TEST_MODEL)
    async with runtime.db.transaction() as s:
        a = await open_sampling_session(s, seq_id=0, checkpoint=None, **kw)
        b = await open_sampling_session(s, seq_id=1, checkpoint=ckpt, **kw)
    assert a.id == f"{sid}:sample:0" and a.checkpoint_id is None and a.model_path is None
    assert b.id == f"{sid}:sample:1" and b.checkpoint_id == ckpt.id
    assert b.model_path == f"tinker://{ckpt.run_id}/sampler_weights/s1"
    assert a.status == b.status == "DEPLOYING" and a.origin == "tinker" and a.run_id is None

    # concurrent repeats of the same call give the same row and one history row
    async def again():
        async with runtime.db.transaction() as s:
            return (await open_sampling_session(s, seq_id=1, checkpoint=ckpt, **kw)).id

    assert set(await asyncio.gather(again(), again(), again())) == {b.id}
    async with runtime.db.session() as s:
        n = (await s.execute(select(func.count()).where(StatusHistory.resource_id == b.id))).scalar_one()
    assert n == 1

    # same id, different target: refused
    with pytest.raises(Conflict):
        async with runtime.db.transaction() as s:
            await open_sampling_session(s, seq_id=0, checkpoint=ckpt, **kw)
