"""Build WorkloadSpecs from rows and the catalog (the desired state handed to a backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_plane.db.models import Run
from control_plane.scheduler.protocol import WorkloadRole, WorkloadSpec
from data_plane.wire.worker_config import TrainerLaunch

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

STORE_SECRET_ENV = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]


def trainer_spec(r: Runtime, run: Run) -> WorkloadSpec:
    model = r.catalog.get(run.base_model)
    launch = TrainerLaunch(
        run_id=run.id,
        model_id=run.id,
        base_model=run.base_model,
        model_source=model.source,
        redis_url=r.settings.redis_url or "",
        store=r.store_spec,
        max_seq_len=run.max_seq_len,
        microbatch_tokens=r.settings.trainer_microbatch_tokens,
    )
    return WorkloadSpec(
        workload_id=run.id,
        role=WorkloadRole.TRAINER,
        org_id=run.org_id,
        session_id=run.session_id,
        base_model=run.base_model,
        command=["python", "-m", "data_plane.trainer"],
        env=launch.to_env(),
        secret_env=STORE_SECRET_ENV if r.store_spec.kind == "s3" else [],
        resources=model.resources.trainer.to_resources(),
    )
