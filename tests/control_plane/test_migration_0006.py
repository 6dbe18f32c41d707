"""Migration 0006 on a database with rows in it: a served model's one checkpoint becomes its
first served_model_checkpoints row (named as the checkpoint, loaded by vLLM under the adapter
name the sampler derives from the storage prefix), and the downgrade puts it back."""

from __future__ import annotations

from control_plane.db import migrate
from data_plane.sampler.names import adapter_name_for_prefix
from tests.control_plane.test_migration_0005 import OLD_ROWS, _exec

PREFIX = "ckpt/org-1/run-live/sampler_weights/s1/"


async def test_0006_moves_the_checkpoint_and_back(migrated_db, clean_state):
    migrate.downgrade(migrated_db, "0004")
    try:
        await _exec(migrated_db, *OLD_ROWS, f"UPDATE checkpoints SET storage_prefix = '{PREFIX}'")
        migrate.upgrade(migrated_db, "0006")
        members, served = await _exec(
            migrated_db,
            "SELECT served_model_id, position, checkpoint_id, model_name, adapter_name, max_abs_delta "
            "FROM served_model_checkpoints",
            "SELECT id, endpoint, verification FROM served_models",
        )
        assert members == [("dep-old", 0, "ckpt-1", "s1", adapter_name_for_prefix(PREFIX), None)]
        assert served == [("dep-old", None, "pending")]

        migrate.downgrade(migrated_db, "0005")
        (old,) = await _exec(migrated_db, "SELECT id, checkpoint_id FROM served_models")
        assert old == [("dep-old", "ckpt-1")]
    finally:
        await _exec(migrated_db, "DELETE FROM orgs")
        migrate.upgrade(migrated_db)
