"""samplers scale to zero: scale_down_delay_seconds and last_request_at

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 19:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "samplers", sa.Column("scale_down_delay_seconds", sa.Integer(), server_default="3600", nullable=False)
    )
    op.add_column("samplers", sa.Column("last_request_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("samplers", "last_request_at")
    op.drop_column("samplers", "scale_down_delay_seconds")
