"""The prepared-statement read path (services/hot_reads.py on the asyncpg pool) answers exactly
what the ORM services answer, with the same tenancy: compared field by field."""

from __future__ import annotations

import msgspec
import pytest

from control_plane.api.loops import presenters as p
from control_plane.auth.principal import Principal
from control_plane.db.engine import ReadOnlySessionError
from control_plane.db.models import Org
from control_plane.errors import InvalidInput, NotFound
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import hot_reads, identity
from control_plane.services import runs as runs_svc
from tests.control_plane.conftest import TEST_MODEL
from tests.control_plane.seed import add_checkpoint

BASE = "http://testserver"


async def orm_run_json(api, principal: Principal, run_id: str) -> dict:
    async with api.runtime.db.session() as s:
        run = await runs_svc.get_run(s, principal, run_id)
        sampler = await runs_svc.paired_sampler(s, run.id)
        users = await p.principal_names(s, {run.created_by})
    return msgspec.to_builtins(p.run_json(run, sampler, BASE, users))


async def hot_run_json(api, principal: Principal, run_id: str) -> dict:
    return msgspec.to_builtins(p.run_view_json(await hot_reads.get_run(api.runtime.db, principal, run_id), BASE))


async def new_run(api, headers: dict[str, str], *, trainer_only: bool = False) -> str:
    sid = (await api.client.post("/v1/loops/sessions", headers=headers, json={})).json()["session"]["id"]
    r = await api.client.post(
        "/v1/loops/trainers" if trainer_only else "/v1/loops/runs",
        headers=headers,
        json={"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 8},
    )
    assert r.status_code == 200, r.text
    return r.json()["run"]["id"]


async def test_get_run_matches_the_orm_path(api) -> None:
    t = await api.tenant("acme")
    with_sampler = await new_run(api, t.headers)
    without = await new_run(api, t.headers, trainer_only=True)
    for run_id in (with_sampler, without):
        hot = await hot_run_json(api, t.principal, run_id)
        assert hot == await orm_run_json(api, t.principal, run_id)
        assert hot["user"]["email"] == "u@example.com"
    assert (await hot_run_json(api, t.principal, with_sampler))["sampler"]["run_id"] == with_sampler
    assert (await hot_run_json(api, t.principal, without))["sampler"] is None


async def test_get_run_of_a_service_account(api) -> None:
    t = await api.tenant("acme")
    async with api.runtime.db.transaction() as s:
        org = await s.get(Org, t.org_id)
        sa = await identity.create_service_account(s, org, "ci-bot")
        key = await identity.create_api_key(s, sa)
    headers = {"Authorization": f"Bearer {key.plaintext}"}
    principal = Principal(t.org_id, sa.id, key.row.id, frozenset(key.row.scopes))
    run_id = await new_run(api, headers)
    hot = await hot_run_json(api, principal, run_id)
    assert hot == await orm_run_json(api, principal, run_id)
    assert hot["user"] == {"id": sa.id, "email": None, "service_account": "ci-bot"}


async def test_get_run_is_tenant_scoped(api) -> None:
    t = await api.tenant("acme")
    other = await api.tenant("globex")
    run_id = await new_run(api, t.headers)
    with pytest.raises(NotFound):
        await hot_reads.get_run(api.runtime.db, other.principal, run_id)
    with pytest.raises(NotFound):
        await hot_reads.get_run(api.runtime.db, t.principal, run_id + "x")


async def test_run_checkpoints_match_the_orm_path_in_both_scopes(api) -> None:
    t = await api.tenant("acme")
    teammate = await api.tenant("acme", email="teammate@example.com")
    other = await api.tenant("globex")
    run_id = await new_run(api, t.headers)
    for i in range(3):
        await add_checkpoint(api.runtime, t, run_id, f"step-{i}")
    await add_checkpoint(api.runtime, t, run_id, "state-0", kind="weights")
    for who, scope, expected in (
        (t, None, 4),
        (t, "org", 4),
        (teammate, None, 0),
        (teammate, "org", 4),
        (other, "org", 0),
    ):
        hot = [
            p.checkpoint_json(c) for c in await hot_reads.run_checkpoints(api.runtime.db, who.principal, run_id, scope)
        ]
        async with api.runtime.db.session() as s:
            orm = await ckpt_svc.list_checkpoints(
                s, who.principal, run_id=run_id, base_model=None, checkpoint_path=None, scope=scope
            )
        assert hot == [p.checkpoint_json(c) for c in orm]
        assert len(hot) == expected, (who.user_id, scope)
    newest_first = await hot_reads.run_checkpoints(api.runtime.db, t.principal, run_id, None)
    assert [c.name for c in newest_first] == ["state-0", "step-2", "step-1", "step-0"]
    assert newest_first[0].lora_config == {"r": 8}  # JSONB decoded, as the ORM does
    with pytest.raises(InvalidInput, match="invalid scope"):
        await hot_reads.run_checkpoints(api.runtime.db, t.principal, run_id, "everyone")


async def test_read_sessions_refuse_writes(api) -> None:
    async with api.runtime.db.session() as s:
        s.add(Org(id="org-x", name="x"))
        with pytest.raises(ReadOnlySessionError):
            await s.flush()


def test_reader_connects_with_the_urls_driver_options() -> None:
    from control_plane.db.reader import Reader

    r = Reader(
        "postgresql+asyncpg://u:p@db.internal:5433/ol?ssl=require&prepared_statement_cache_size=10&command_timeout=5",
        max_size=2,
    )
    assert r._connect_kwargs == {
        "host": "db.internal",
        "port": 5433,
        "user": "u",
        "password": "p",
        "database": "ol",
        "ssl": "require",
        "command_timeout": 5.0,
    }
