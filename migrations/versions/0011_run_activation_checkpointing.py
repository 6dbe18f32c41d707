"""Runs: the activation checkpointing mode a run chose at creation

``runs.activation_checkpointing`` is ``auto``, ``on`` or ``off`` when the run chose one (the
Loops create body's ``activation_checkpointing`` field, the Tinker ``user_metadata`` key
``openloops.activation_checkpointing``) and NULL when it did not: its trainer then uses the
server's ``OPENLOOPS_TRAINER_ACTIVATION_CHECKPOINTING``. The run's seq-0 op carries it to the
worker (control_plane/services/run_options.py).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 04:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("activation_checkpointing", sa.String(length=8), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "activation_checkpointing")
