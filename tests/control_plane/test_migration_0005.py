"""Migration 0005 on a database with rows in it: served checkpoints ("deployments" until then)
become served models with their request counters and history, every run gets the deployment
it ran on, and the downgrade restores the old shape."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from control_plane.db import migrate


async def _exec(url: str, *statements: str) -> list[list[tuple]]:
    eng = create_async_engine(url)
    out = []
    async with eng.begin() as c:
        for st in statements:
            res = await c.execute(text(st))
            out.append([tuple(r) for r in res.all()] if res.returns_rows else [])
    await eng.dispose()
    return out


OLD_ROWS = [
    "INSERT INTO orgs (id, name) VALUES ('org-1', 'acme')",
    "INSERT INTO sessions (id, org_id, created_by, origin, status, tags, user_metadata) "
    "VALUES ('sess-1', 'org-1', 'usr-1', 'loops', 'active', '{}', '{}')",
    *[
        "INSERT INTO runs (id, org_id, created_by, session_id, origin, name, base_model, status, lora_rank, lora_config, "
        f"max_seq_len, scale_down_delay_seconds, availability_model, replicas, user_metadata) VALUES ('{rid}', 'org-1', "
        f"'usr-1', 'sess-1', 'loops', '{rid}', 'm', '{status}', 8, '{{}}', 512, 3600, 'dedicated', 1, '{{}}')"
        for rid, status in (("run-live", "ACTIVE"), ("run-done", "FAILED"))
    ],
    "INSERT INTO checkpoints (id, org_id, created_by, run_id, kind, name, base_model, storage_prefix, size_bytes, "
    "user_metadata, sync_status) VALUES ('ckpt-1', 'org-1', 'usr-1', 'run-live', 'sampler_weights', 's1', 'm', 'p', 1, '{}', 'COMPLETE')",
    "INSERT INTO deployments (id, org_id, created_by, base_model, name, status, checkpoint_id, availability_model, "
    "node_count, scale_down_delay_seconds) VALUES ('dep-old', 'org-1', 'usr-1', 'm', 'served', 'ACTIVE', 'ckpt-1', 'dedicated', 1, 60)",
    "INSERT INTO deployment_request_buckets (deployment_id, bucket_start, count_2xx, count_4xx, count_5xx, max_concurrent, "
    "latency_hist) VALUES ('dep-old', '2026-12-01 10:00+00', 3, 1, 0, 2, '{1,2,1,0,0,0,0,0,0,0,0,0,0,0}')",
    "INSERT INTO status_history (org_id, resource_type, resource_id, from_status, to_status) "
    "VALUES ('org-1', 'deployment', 'dep-old', NULL, 'DEPLOYING')",
]


async def test_0005_moves_rows_and_back(migrated_db, clean_state):
    migrate.downgrade(migrated_db, "0004")
    try:
        await _exec(migrated_db, *OLD_ROWS)
        migrate.upgrade(migrated_db, "0005")
        served, buckets, hist, deps, runs = await _exec(
            migrated_db,
            "SELECT id, name, checkpoint_id, status FROM served_models",
            "SELECT resource_type, resource_id, count_2xx, count_4xx, max_concurrent, latency_hist FROM request_buckets",
            "SELECT resource_type, resource_id FROM status_history WHERE resource_id = 'dep-old'",
            "SELECT active_run_id, status, availability_model, max_seq_len FROM deployments ORDER BY active_run_id",
            "SELECT r.id, r.deployment_id = d.id, r.policy_version FROM runs r JOIN deployments d ON d.active_run_id = r.id ORDER BY r.id",
        )
        assert served == [("dep-old", "served", "ckpt-1", "ACTIVE")]
        assert buckets == [("served_model", "dep-old", 3, 1, 2, [1, 2, 1] + [0] * 11)]
        assert hist == [("served_model", "dep-old")]
        # every run ran on a deployment of its own: live for a live run, stopped for an ended one
        assert deps == [("run-done", "INACTIVE", "dedicated", 512), ("run-live", "DEPLOYING", "dedicated", 512)]
        assert runs == [("run-done", True, 0), ("run-live", True, 0)]

        migrate.downgrade(migrated_db, "0004")
        old, old_buckets, old_hist, runs_dep = await _exec(
            migrated_db,
            "SELECT id, name, checkpoint_id FROM deployments",
            "SELECT deployment_id, count_2xx FROM deployment_request_buckets",
            "SELECT resource_type FROM status_history WHERE resource_id = 'dep-old'",
            "SELECT count(*) FROM runs WHERE deployment_id IS NOT NULL",
        )
        assert old == [("dep-old", "served", "ckpt-1")] and old_buckets == [("dep-old", 3)]
        assert old_hist == [("deployment",)] and runs_dep == [(0,)]
    finally:
        await _exec(migrated_db, "DELETE FROM orgs")
        migrate.upgrade(migrated_db)
