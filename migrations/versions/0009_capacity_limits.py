"""Capacity: per-org ceilings on the GPUs of each type that live workloads hold

``capacity_limits`` holds one row per (org, GPU type) with a ceiling set by an operator
(``operator_max_gpus``, ``openloops admin capacity set``) and/or by the org's admins
(``org_max_gpus``, ``PATCH /v1/training/capacity``); the lower one applies, and a type without
a row falls back to ``OPENLOOPS_CAPACITY_DEFAULT_MAX_GPUS`` (control_plane/services/capacity.py).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-20 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "capacity_limits",
        sa.Column(
            "org_id",
            sa.String(length=40),
            sa.ForeignKey("orgs.id", ondelete="CASCADE", name="capacity_limits_org_id_fkey"),
            primary_key=True,
        ),
        sa.Column("gpu_type", sa.String(length=100), primary_key=True),
        sa.Column("operator_max_gpus", sa.Integer(), nullable=True),
        sa.Column("org_max_gpus", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("operator_max_gpus IS NULL OR operator_max_gpus >= 0", name="ck_capacity_operator_max"),
        sa.CheckConstraint("org_max_gpus IS NULL OR org_max_gpus >= 0", name="ck_capacity_org_max"),
    )


def downgrade() -> None:
    op.drop_table("capacity_limits")
