"""notify API processes when rows behind their read cache change

Every API process caches the hottest reads (a run with its paired sampler and creator, a run's
checkpoints) for a moment and LISTENs on ``openloops_reads``: these triggers send the id of the
affected run whenever a run, sampler or checkpoint row changes, and ``*`` (drop everything)
when a user or service account changes (their names appear in run views). Triggers rather than
application code, so that every writer — API replicas, the controller, the admin CLI, manual
SQL — invalidates the caches. Identical notifications in one transaction are delivered once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 00:10:00
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

CHANNEL = "openloops_reads"

# an update that only moved last_request_at (the controller records activity every second
# while a run or sampler is used; no cached read shows it) notifies nobody
_ONLY_ACTIVITY = """
        IF TG_OP = 'UPDATE' AND (to_jsonb(NEW) - 'last_request_at') = (to_jsonb(OLD) - 'last_request_at') THEN
            RETURN NULL;
        END IF;
"""

# table -> (function name, body): each notifies the run ids a change affects
_FUNCTIONS = {
    "runs": (
        "openloops_reads_notify_run",
        _ONLY_ACTIVITY
        + f"""
        IF TG_OP <> 'INSERT' THEN PERFORM pg_notify('{CHANNEL}', OLD.id); END IF;
        IF TG_OP <> 'DELETE' THEN PERFORM pg_notify('{CHANNEL}', NEW.id); END IF;
    """,
    ),
    "samplers": (
        "openloops_reads_notify_by_run_id",
        _ONLY_ACTIVITY
        + f"""
        IF TG_OP <> 'INSERT' AND OLD.run_id IS NOT NULL THEN PERFORM pg_notify('{CHANNEL}', OLD.run_id); END IF;
        IF TG_OP <> 'DELETE' AND NEW.run_id IS NOT NULL THEN PERFORM pg_notify('{CHANNEL}', NEW.run_id); END IF;
    """,
    ),
    "users": (
        "openloops_reads_notify_all",
        f"""
        PERFORM pg_notify('{CHANNEL}', '*');
    """,
    ),
}
# checkpoints share the by-run-id function (they have no last_request_at: to_jsonb of both
# sides just compares whole rows), service accounts the notify-all one
_TRIGGERS = {
    "runs": ("openloops_reads_notify_run", "INSERT OR UPDATE OR DELETE"),
    "samplers": ("openloops_reads_notify_by_run_id", "INSERT OR UPDATE OR DELETE"),
    "checkpoints": ("openloops_reads_notify_by_run_id", "INSERT OR UPDATE OR DELETE"),
    "users": ("openloops_reads_notify_all", "UPDATE OR DELETE"),
    "service_accounts": ("openloops_reads_notify_all", "UPDATE OR DELETE"),
}


def upgrade() -> None:
    for name, body in _FUNCTIONS.values():
        op.execute(f"""
            CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
            {body}
                RETURN NULL;
            END $$
        """)
    for table, (fn, events) in _TRIGGERS.items():
        op.execute(f"""
            CREATE TRIGGER {table}_reads_notify AFTER {events} ON {table}
            FOR EACH ROW EXECUTE FUNCTION {fn}()
        """)


def downgrade() -> None:
    for table in _TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_reads_notify ON {table}")
    for name, _body in _FUNCTIONS.values():
        op.execute(f"DROP FUNCTION IF EXISTS {name}()")
