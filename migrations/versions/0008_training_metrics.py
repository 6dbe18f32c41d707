"""Training telemetry: one row of metrics per run and optimizer step

``training_metrics`` holds what the trainer reported for the ops of each optimizer step of a
run (``metrics``, merged by the control plane's telemetry consumer:
control_plane/telemetry/merge.py), the time of the step's last op, and ``seqs``: the op seq ids
already merged into the row, so that an op delivered twice is counted once. Rows go with their
run; the controller deletes rows older than ``OPENLOOPS_TRAINING_METRICS_RETENTION_DAYS``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-12 12:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_metrics",
        sa.Column(
            "run_id",
            sa.String(length=128),
            sa.ForeignKey("runs.id", ondelete="CASCADE", name="training_metrics_run_id_fkey"),
            primary_key=True,
        ),
        sa.Column("step", sa.Integer(), primary_key=True),
        sa.Column("org_id", sa.String(length=40), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metrics", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("seqs", postgresql.ARRAY(sa.BigInteger()), nullable=False, server_default=sa.text("'{}'")),
    )
    op.create_index("ix_training_metrics_time", "training_metrics", ["time"])


def downgrade() -> None:
    op.drop_index("ix_training_metrics_time", table_name="training_metrics")
    op.drop_table("training_metrics")
