"""Sampling telemetry: samples and tokens in the per-minute request counters

``request_buckets`` gains ``samples``, ``prompt_tokens`` and ``completion_tokens`` (what vLLM
reported for the requests of that minute). Rows of ``resource_type`` ``run`` are the sampling a
run's samplers did (both APIs; control_plane/sampling/dispatcher.py), read by
``GET /v1/loops/runs/{run_id}/sampling_metrics`` and by usage (``GET /v1/loops/usage``).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 01:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COLUMNS = ("samples", "prompt_tokens", "completion_tokens")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column("request_buckets", sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("request_buckets", name)
