"""Checkpoints can be published (Tinker ``publish`` / ``unpublish``)

``checkpoints.public``: a published checkpoint can be started from by other orgs, by its path.
Existing checkpoints stay private.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("checkpoints", sa.Column("public", sa.Boolean(), nullable=False, server_default=sa.text("false")))


def downgrade() -> None:
    op.drop_column("checkpoints", "public")
