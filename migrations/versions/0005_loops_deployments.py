"""Loops deployments; served checkpoints become served models

Until now a "deployment" row was a checkpoint served as an OpenAI-compatible model. In the
Loops API a deployment is the dedicated trainer workload that runs execute on (a run's
``deployment_id``; ``reuse_from_run_id`` puts a new run on a warm one). This migration gives
each meaning its own name:

- ``deployments`` -> ``served_models`` (checkpoints served by their own vLLM server), without
  the Loops-only columns it carried; its per-minute request counters move to the generic
  ``request_buckets`` table (keyed by resource type and id), which Loops deployments share;
  status history rows follow the rename.
- a new ``deployments`` table for Loops deployments. Every existing run gets one (its trainer
  ran on it), live for live runs, so ``runs.deployment_id`` is always set.
- runs: ``base_checkpoint`` (the checkpoint a run's adapter started from), ``policy_version``
  and ``published_checkpoint_id`` (the adapter the run's paired sampler serves, and its
  version: the trainer's optimizer step when it was published). Checkpoints record their
  ``policy_version`` too.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 11:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TERMINAL = "('INACTIVE', 'FAILED', 'DEPLOY_FAILED', 'BUILD_FAILED')"
_OLD_LOOPS_COLUMNS = ("active_run_id", "latest_run_id", "availability_model", "instance_type", "node_count")


def upgrade() -> None:
    # --- served models (the old deployments) ---------------------------------------------
    op.rename_table("deployments", "served_models")
    for old, new in (
        ("deployments_pkey", "served_models_pkey"),
        ("deployments_org_id_fkey", "served_models_org_id_fkey"),
        ("deployments_checkpoint_id_fkey", "served_models_checkpoint_id_fkey"),
        ("deployments_sampler_id_fkey", "served_models_sampler_id_fkey"),
    ):
        op.execute(f"ALTER TABLE served_models RENAME CONSTRAINT {old} TO {new}")
    op.execute("ALTER INDEX ix_deployments_org_created RENAME TO ix_served_models_org_created")
    op.execute("ALTER INDEX ix_deployments_status RENAME TO ix_served_models_status")
    for col in _OLD_LOOPS_COLUMNS:
        op.drop_column("served_models", col)
    op.execute("UPDATE status_history SET resource_type = 'served_model' WHERE resource_type = 'deployment'")

    op.create_table(
        "request_buckets",
        sa.Column("resource_type", sa.String(length=16), nullable=False),
        sa.Column("resource_id", sa.String(length=128), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count_2xx", sa.Integer(), nullable=False),
        sa.Column("count_4xx", sa.Integer(), nullable=False),
        sa.Column("count_5xx", sa.Integer(), nullable=False),
        sa.Column("max_concurrent", sa.Integer(), nullable=False),
        sa.Column("latency_hist", postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "resource_id", "bucket_start"),
    )
    op.execute("""
        INSERT INTO request_buckets (resource_type, resource_id, bucket_start, count_2xx, count_4xx,
                                     count_5xx, max_concurrent, latency_hist)
        SELECT 'served_model', deployment_id, bucket_start, count_2xx, count_4xx, count_5xx,
               max_concurrent, latency_hist
        FROM deployment_request_buckets
    """)
    op.drop_table("deployment_request_buckets")

    op.create_table(
        "usage_samples",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("resource_type", sa.String(length=16), nullable=False),
        sa.Column("resource_id", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replica", sa.String(length=253), nullable=False),
        sa.Column("node", sa.String(length=253), nullable=True),
        sa.Column("cpu_cores", sa.Float(), nullable=True),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("ephemeral_bytes", sa.BigInteger(), nullable=True),
        sa.Column("ephemeral_capacity_bytes", sa.BigInteger(), nullable=True),
        sa.Column("gpus", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_usage_samples_resource_at", "usage_samples", ["resource_type", "resource_id", "at"])

    # --- Loops deployments -----------------------------------------------------------------
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("created_by", sa.String(length=40), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("active_run_id", sa.String(length=128), nullable=True),
        sa.Column("latest_run_id", sa.String(length=128), nullable=True),
        sa.Column("availability_model", sa.String(length=16), nullable=False, server_default="dedicated"),
        sa.Column("replicas", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("instance_type", sa.String(length=100), nullable=True),
        sa.Column("node_count", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("max_seq_len", sa.Integer(), nullable=False),
        sa.Column("scale_down_delay_seconds", sa.Integer(), nullable=False),
        sa.Column("last_request_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("deactivated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_deployments_org_created", "deployments", ["org_id", "created_at", "id"])
    op.create_index("ix_deployments_status", "deployments", ["status"])
    # every existing run ran on a trainer of its own: that was its deployment
    op.execute(f"""
        INSERT INTO deployments (id, org_id, created_by, base_model, name, status, status_reason,
                                 active_run_id, latest_run_id, availability_model, replicas,
                                 max_seq_len, scale_down_delay_seconds, created_at, updated_at,
                                 deactivated_at)
        SELECT 'dep-' || substr(md5(r.id), 1, 16), r.org_id, r.created_by, r.base_model, r.name,
               CASE WHEN r.status IN {TERMINAL} THEN 'INACTIVE' ELSE 'DEPLOYING' END,
               CASE WHEN r.status IN {TERMINAL} THEN 'its run ended before deployments existed'
                    ELSE 'created for a run that existed before deployments' END,
               r.id, r.id, r.availability_model, r.replicas, r.max_seq_len,
               r.scale_down_delay_seconds, r.created_at, now(), r.deactivated_at
        FROM runs r
    """)
    op.execute("UPDATE runs SET deployment_id = 'dep-' || substr(md5(id), 1, 16)")
    op.create_foreign_key(
        "runs_deployment_id_fkey", "runs", "deployments", ["deployment_id"], ["id"], ondelete="SET NULL"
    )
    op.create_index("ix_runs_deployment", "runs", ["deployment_id", "created_at"])

    # --- published adapters and versions ----------------------------------------------------
    op.add_column("runs", sa.Column("base_checkpoint", sa.Text(), nullable=True))
    op.add_column("runs", sa.Column("policy_version", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("runs", sa.Column("published_checkpoint_id", sa.String(length=40), nullable=True))
    op.create_foreign_key(
        "runs_published_checkpoint_id_fkey",
        "runs",
        "checkpoints",
        ["published_checkpoint_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.add_column("checkpoints", sa.Column("policy_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("checkpoints", "policy_version")
    op.drop_constraint("runs_published_checkpoint_id_fkey", "runs", type_="foreignkey")
    op.drop_column("runs", "published_checkpoint_id")
    op.drop_column("runs", "policy_version")
    op.drop_column("runs", "base_checkpoint")
    op.drop_index("ix_runs_deployment", table_name="runs")
    op.drop_constraint("runs_deployment_id_fkey", "runs", type_="foreignkey")
    op.execute("UPDATE runs SET deployment_id = NULL")
    op.drop_index("ix_deployments_status", table_name="deployments")
    op.drop_index("ix_deployments_org_created", table_name="deployments")
    op.drop_table("deployments")
    op.execute("DELETE FROM status_history WHERE resource_type = 'deployment'")

    op.drop_index("ix_usage_samples_resource_at", table_name="usage_samples")
    op.drop_table("usage_samples")

    op.create_table(
        "deployment_request_buckets",
        sa.Column("deployment_id", sa.String(length=40), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count_2xx", sa.Integer(), nullable=False),
        sa.Column("count_4xx", sa.Integer(), nullable=False),
        sa.Column("count_5xx", sa.Integer(), nullable=False),
        sa.Column("max_concurrent", sa.Integer(), nullable=False),
        sa.Column("latency_hist", postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.PrimaryKeyConstraint("deployment_id", "bucket_start"),
    )
    op.execute("""
        INSERT INTO deployment_request_buckets (deployment_id, bucket_start, count_2xx, count_4xx,
                                                count_5xx, max_concurrent, latency_hist)
        SELECT resource_id, bucket_start, count_2xx, count_4xx, count_5xx, max_concurrent, latency_hist
        FROM request_buckets WHERE resource_type = 'served_model'
    """)
    op.drop_table("request_buckets")

    op.execute("UPDATE status_history SET resource_type = 'deployment' WHERE resource_type = 'served_model'")
    op.add_column("served_models", sa.Column("active_run_id", sa.String(length=128), nullable=True))
    op.add_column("served_models", sa.Column("latest_run_id", sa.String(length=128), nullable=True))
    op.add_column(
        "served_models",
        sa.Column("availability_model", sa.String(length=16), nullable=False, server_default="dedicated"),
    )
    op.add_column("served_models", sa.Column("instance_type", sa.String(length=100), nullable=True))
    op.add_column("served_models", sa.Column("node_count", sa.Integer(), nullable=False, server_default="1"))
    op.execute("ALTER INDEX ix_served_models_status RENAME TO ix_deployments_status")
    op.execute("ALTER INDEX ix_served_models_org_created RENAME TO ix_deployments_org_created")
    for old, new in (
        ("served_models_pkey", "deployments_pkey"),
        ("served_models_org_id_fkey", "deployments_org_id_fkey"),
        ("served_models_checkpoint_id_fkey", "deployments_checkpoint_id_fkey"),
        ("served_models_sampler_id_fkey", "deployments_sampler_id_fkey"),
    ):
        op.execute(f"ALTER TABLE served_models RENAME CONSTRAINT {old} TO {new}")
    op.rename_table("served_models", "deployments")
