"""Rows for the benchmarks: one tenant created through the service layer (org, user, key,
session, run with its paired sampler, checkpoints with files), and filler checkpoints bulk
inserted with SQL, spread over many runs and orgs, so that the table can grow to 100k rows
in seconds while the measured result sets stay the same size. A tenth of the filler belongs
to the tenant's own user (other runs, another base model), so an index on org and creator
alone does not answer the measured lists."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text

from bench.stack import BENCH_MODEL, OTHER_MODEL
from control_plane.auth.principal import Principal
from control_plane.catalog import ModelCatalog
from control_plane.db.engine import Database
from control_plane.services import checkpoints as ckpt_svc
from control_plane.services import identity
from control_plane.services import runs as runs_svc
from control_plane.services import sessions as sessions_svc

TABLES = (
    "status_history, request_buckets, usage_samples, served_models, checkpoint_files, checkpoints, samplers, "
    "runs, deployments, sessions, training_projects, api_keys, service_accounts, users, orgs"
)
TENANT_CHECKPOINTS = 20  # what the measured list routes return, at every table size
CHECKPOINTS_PER_FILLER_RUN = 50
FILLER_ORGS = 45
TENANT_SLOTS = 5  # of 50 owner slots: 10% of the filler belongs to the tenant's own user


@dataclass(frozen=True)
class Tenant:
    org_id: str
    user_id: str
    key: str
    run_id: str
    checkpoint_id: str
    checkpoint_path: str  # bt://loops:<run>/sampler_weights/<name>


async def reset(db: Database) -> None:
    async with db.transaction() as s:
        await s.execute(text(f"TRUNCATE {TABLES} CASCADE"))


async def seed_tenant(db: Database, catalog: ModelCatalog) -> Tenant:
    async with db.transaction() as s:
        org = await identity.create_org(s, "bench")
        user = await identity.create_user(s, org, "bench@example.com")
        key = await identity.create_api_key(s, user)
        principal = Principal(org.id, user.id, key.row.id, frozenset(key.row.scopes))
        session = await sessions_svc.create_session(s, principal, origin="loops")
        run = (
            await runs_svc.create_run(
                s,
                principal,
                catalog,
                runs_svc.RunRequest(session_id=session.id, base_model=BENCH_MODEL, lora_rank=8),
                3600,
            )
        ).run
        files = [("adapter_config.json", 512), ("adapter_model.safetensors", 1 << 20), ("README.md", 100)]
        ckpts = []
        for i in range(TENANT_CHECKPOINTS):
            kind = "sampler_weights" if i % 2 == 0 else "weights"
            name = f"step-{i:04d}"
            ckpts.append(
                await ckpt_svc.record_checkpoint(
                    s,
                    run,
                    kind=kind,
                    name=name,
                    storage_prefix=f"ckpt/{org.id}/{run.id}/{kind}/{name}/v1",
                    files=files,
                    lora_config={"r": 8},
                )
            )
    first = ckpts[0]
    return Tenant(org.id, user.id, key.plaintext, run.id, first.id, f"bt://loops:{run.id}/{first.kind}/{first.name}")


async def _filler_owners(db: Database, tenant: Tenant) -> list[tuple[str, str, str, str]]:
    """(org_id, user_id, session_id, base_model) per owner slot: ``TENANT_SLOTS`` slots for
    the tenant's own user (other runs, on another base model: one user with many runs) and
    one user in each of ``FILLER_ORGS`` other orgs (on the tenant's base model)."""
    async with db.transaction() as s:
        q = text("SELECT org_id, created_by, id FROM sessions WHERE display_name = 'bench-filler' ORDER BY org_id, id")
        found = [tuple(x) for x in (await s.execute(q)).all()]
        if not found:
            me = Principal(tenant.org_id, tenant.user_id, "none", frozenset())
            sess = await sessions_svc.create_session(s, me, origin="loops", display_name="bench-filler")
            found.append((tenant.org_id, tenant.user_id, sess.id))
            for i in range(FILLER_ORGS):
                org = await identity.create_org(s, f"filler-{i:02d}")
                user = await identity.create_user(s, org, "filler@example.com")
                p = Principal(org.id, user.id, "none", frozenset())
                sess = await sessions_svc.create_session(s, p, origin="loops", display_name="bench-filler")
                found.append((org.id, user.id, sess.id))
    mine = [(*o, OTHER_MODEL) for o in found if o[0] == tenant.org_id]
    others = [(*o, BENCH_MODEL) for o in found if o[0] != tenant.org_id]
    return mine * TENANT_SLOTS + others


_RUNS = """
INSERT INTO runs (id, org_id, created_by, session_id, origin, name, base_model, status, lora_rank,
                  lora_config, max_seq_len, scale_down_delay_seconds, availability_model, replicas,
                  user_metadata, created_at, updated_at)
SELECT 'run-fill-' || (:r0 + g), (CAST(:orgs AS text[]))[g % :slots + 1], (CAST(:users AS text[]))[g % :slots + 1],
       (CAST(:sessions AS text[]))[g % :slots + 1],
       'loops', 'filler', (CAST(:models AS text[]))[g % :slots + 1], 'INACTIVE', 8, '{}'::jsonb, 2048, 3600,
       'dedicated', 1, '{}'::jsonb,
       now() + (random() - 0.5) * interval '60 days', now()
FROM generate_series(0, :n - 1) AS g
"""

_CHECKPOINTS = """
INSERT INTO checkpoints (id, org_id, created_by, run_id, kind, name, base_model, storage_prefix, size_bytes,
                         lora_config, user_metadata, sync_status, created_at)
SELECT 'ckpt-fill-' || (:c0 + g), r.org_id, r.created_by, r.id,
       CASE WHEN g % 2 = 0 THEN 'sampler_weights' ELSE 'weights' END, 'step-' || (:c0 + g), r.base_model,
       'ckpt/' || r.org_id || '/' || r.id || '/' || (:c0 + g), 1049188, '{"r": 8}'::jsonb, '{}'::jsonb, 'COMPLETE',
       r.created_at + (g % :per_run) * interval '1 minute'
FROM generate_series(0, :n - 1) AS g
JOIN runs r ON r.id = 'run-fill-' || (:r0 + g / :per_run)
"""

_FILES = """
INSERT INTO checkpoint_files (checkpoint_id, relative_path, size_bytes, node_rank, last_modified)
SELECT 'ckpt-fill-' || (:c0 + g), f.p, 1024, 0, now()
FROM generate_series(0, :n - 1) AS g CROSS JOIN (VALUES ('adapter_config.json'), ('adapter_model.safetensors')) AS f(p)
"""


async def count_checkpoints(db: Database) -> int:
    async with db.session() as s:
        return int((await s.execute(text("SELECT count(*) FROM checkpoints"))).scalar_one())


async def grow_checkpoints(db: Database, tenant: Tenant, total: int) -> int:
    """Insert filler checkpoints (2 files each) until the table holds ``total`` rows; then
    VACUUM ANALYZE, as autovacuum would after such a change. Returns the row count."""
    have = await count_checkpoints(db)
    need = total - have
    if need <= 0:
        return have
    owners = await _filler_owners(db, tenant)
    async with db.transaction() as s:
        r0 = int((await s.execute(text("SELECT count(*) FROM runs WHERE id LIKE 'run-fill-%'"))).scalar_one())
        c0 = int((await s.execute(text("SELECT count(*) FROM checkpoints WHERE id LIKE 'ckpt-fill-%'"))).scalar_one())
        n_runs = -(-need // CHECKPOINTS_PER_FILLER_RUN)
        await s.execute(
            text(_RUNS),
            {
                "r0": r0,
                "n": n_runs,
                "slots": len(owners),
                "models": [o[3] for o in owners],
                "orgs": [o[0] for o in owners],
                "users": [o[1] for o in owners],
                "sessions": [o[2] for o in owners],
            },
        )
        # each call numbers its checkpoints from its own first run, so runs are never shared
        await s.execute(text(_CHECKPOINTS), {"c0": c0, "r0": r0, "n": need, "per_run": CHECKPOINTS_PER_FILLER_RUN})
        await s.execute(text(_FILES), {"c0": c0, "n": need})
    async with db.engine.connect() as conn:
        ac = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("runs", "checkpoints", "checkpoint_files"):
            await ac.execute(text(f"VACUUM ANALYZE {table}"))
    return await count_checkpoints(db)
