"""Served models hold several checkpoints, know their endpoint and their verification

A served model (``POST /v1/loops/checkpoints/deploy``) serves one or more LoRA checkpoints of
one base model from its own vLLM server. Until now it had one ``checkpoint_id``; this migration:

- adds ``served_model_checkpoints`` (served model, position, checkpoint, the name clients pass
  as ``model``, the vLLM adapter name, and the verification result: the largest difference
  between the served prompt logprobs and the trainer's on the checkpoint's probe sequence),
  filled from ``served_models.checkpoint_id``, which is dropped;
- adds ``served_models.endpoint`` (where its vLLM server answers, while it is up),
  ``instance_type_id``, ``hf_secret_name`` and ``verification`` (ok | flagged | unverified |
  error, with ``verified_at``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 16:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_model_checkpoints",
        sa.Column(
            "served_model_id",
            sa.String(length=40),
            sa.ForeignKey("served_models.id", ondelete="CASCADE", name="served_model_checkpoints_served_model_id_fkey"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column(
            "checkpoint_id",
            sa.String(length=40),
            sa.ForeignKey("checkpoints.id", ondelete="CASCADE", name="served_model_checkpoints_checkpoint_id_fkey"),
            nullable=False,
        ),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("adapter_name", sa.Text(), nullable=False),
        sa.Column("max_abs_delta", sa.Float(), nullable=True),
        sa.Column("verify_detail", sa.Text(), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("served_model_id", "model_name", name="uq_served_model_checkpoints_name"),
    )
    op.create_index("ix_served_model_checkpoints_checkpoint", "served_model_checkpoints", ["checkpoint_id"])
    # the adapter name is the one vLLM loads it by (data_plane.sampler.names.adapter_name_for_prefix)
    op.execute(
        "INSERT INTO served_model_checkpoints (served_model_id, position, checkpoint_id, model_name, adapter_name) "
        "SELECT sm.id, 0, c.id, c.name, btrim(c.storage_prefix, '/') "
        "FROM served_models sm JOIN checkpoints c ON c.id = sm.checkpoint_id"
    )
    op.drop_constraint("served_models_checkpoint_id_fkey", "served_models", type_="foreignkey")
    op.drop_column("served_models", "checkpoint_id")
    op.add_column("served_models", sa.Column("endpoint", sa.Text(), nullable=True))
    op.add_column("served_models", sa.Column("instance_type_id", sa.String(length=100), nullable=True))
    op.add_column("served_models", sa.Column("hf_secret_name", sa.String(length=253), nullable=True))
    op.add_column(
        "served_models", sa.Column("verification", sa.String(length=16), nullable=False, server_default="pending")
    )
    op.add_column("served_models", sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.add_column("served_models", sa.Column("checkpoint_id", sa.String(length=40), nullable=True))
    op.create_foreign_key(
        "served_models_checkpoint_id_fkey",
        "served_models",
        "checkpoints",
        ["checkpoint_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.execute(
        "UPDATE served_models sm SET checkpoint_id = smc.checkpoint_id FROM served_model_checkpoints smc "
        "WHERE smc.served_model_id = sm.id AND smc.position = 0"
    )
    for col in ("verified_at", "verification", "hf_secret_name", "instance_type_id", "endpoint"):
        op.drop_column("served_models", col)
    op.drop_index("ix_served_model_checkpoints_checkpoint", table_name="served_model_checkpoints")
    op.drop_table("served_model_checkpoints")
