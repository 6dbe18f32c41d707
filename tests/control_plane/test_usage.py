"""Usage (GET /v1/loops/usage, control_plane/metering/usage_report.py) from a history whose
times this test writes: worker-seconds from the running intervals (scale to zero and back,
deactivation), a run's share of its deployment, the org's samplers of one base model merged
into one server, tokens trained from the telemetry, sampling from the request counters,
grouping by run and by UTC day (an interval across midnight splits), window clipping, another
org, and bad parameters. Real Postgres; the lifetimes of real workers are compared in
tests/e2e/test_usage_live.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, update

from control_plane.db.models import Deployment, RequestBucket, Run, Sampler, StatusHistory, TrainingMetric
from control_plane.metering import lifetimes
from control_plane.metering.requests import LATENCY_BUCKETS_MS, RUN_SAMPLING, SAMPLER_SAMPLING
from tests.control_plane.conftest import TEST_MODEL
from tests.control_plane.test_training_metrics import run_of

T0 = datetime(2026, 11, 2, 23, 0, tzinfo=UTC)


def m(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_running_intervals_open_and_close_on_status_changes():
    changes = [(m(0), "DEPLOYING"), (m(10), "ACTIVE"), (m(70), "SCALED_TO_ZERO"), (m(100), "WAKING_UP")]
    # DEPLOYING is asked for, not running: the interval opens when the workload is seen started
    assert lifetimes.running_intervals(changes, until=m(120)) == [(m(10), m(70)), (m(100), m(120))]
    assert lifetimes.union([(m(5), m(50)), (m(40), m(60)), (m(60), m(61))]) == [(m(5), m(61))]
    assert lifetimes.by_day([(m(0), m(130))]) == {T0.date(): 3600.0, (T0 + timedelta(days=1)).date(): 70 * 60.0}


async def seed(api) -> tuple[object, str]:
    """acme's run (its deployment and paired sampler), another sampler of the same base model
    with no run, their history, telemetry and sampling counters, at known times."""
    t, run_id = await run_of(api)
    async with api.runtime.db.transaction() as s:
        run = await s.get(Run, run_id)
        assert run is not None and run.deployment_id is not None
        org = run.org_id
        await s.execute(delete(StatusHistory).where(StatusHistory.org_id == org))
        run.created_at = T0
        deployment = await s.get(Deployment, run.deployment_id)
        assert deployment is not None
        deployment.created_at = T0
        paired = run_id
        other = Sampler(
            id="smp-usage-base",
            org_id=org,
            created_by=run.created_by,
            origin="loops",
            base_model=TEST_MODEL,
            status="INACTIVE",
            created_at=m(40),
        )
        s.add(other)
        samplers = list((await s.execute(Sampler.__table__.select().where(Sampler.run_id == paired))).all())
        assert len(samplers) == 1
        paired_sampler = samplers[0].id
        await s.execute(update(Sampler).where(Sampler.id == paired_sampler).values(created_at=m(5)))

        def hist(kind: str, rid: str, *changes: tuple[float, str]) -> None:
            for at, to in changes:
                s.add(StatusHistory(org_id=org, resource_type=kind, resource_id=rid, to_status=to, created_at=m(at)))

        # the trainer runs [10, 70) and [100, 131) minutes: 91 minutes (DEPLOYING does not count)
        hist("deployment", run.deployment_id, (0, "DEPLOYING"), (10, "ACTIVE"), (70, "SCALED_TO_ZERO"),
             (100, "WAKING_UP"), (130, "DEACTIVATING"), (131, "INACTIVE"))  # fmt: skip
        # the run ends at 120: its share is [10, 70) + [100, 120) = 80 minutes
        hist("run", run_id, (0, "DEPLOYING"), (10, "ACTIVE"), (120, "INACTIVE"))
        # the two samplers share one server: [20, 50) and [42, 60) -> [20, 60), 40 minutes
        hist("sampler", paired_sampler, (5, "DEPLOYING"), (20, "ACTIVE"), (50, "SCALED_TO_ZERO"))
        hist("sampler", other.id, (40, "DEPLOYING"), (42, "ACTIVE"), (60, "INACTIVE"))
        for step, (at, tokens) in enumerate(((15, 100), (25, 40), (70, 7)), start=1):
            s.add(TrainingMetric(run_id=run_id, step=step, org_id=org, time=m(at), metrics={"tokens": tokens}))
        zeros = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        for rtype, rid, at, ok, bad, samples, prompt, completion in (
            (RUN_SAMPLING, run_id, 20, 3, 1, 5, 30, 50),
            (RUN_SAMPLING, run_id, 61, 1, 0, 2, 6, 8),  # the next day (00:01)
            (SAMPLER_SAMPLING, other.id, 45, 2, 0, 2, 10, 20),
        ):
            s.add(
                RequestBucket(
                    resource_type=rtype, resource_id=rid, bucket_start=m(at), count_2xx=ok, count_4xx=bad,
                    count_5xx=0, max_concurrent=1, latency_hist=zeros, samples=samples,
                    prompt_tokens=prompt, completion_tokens=completion,
                )
            )  # fmt: skip
    return t, run_id


async def usage(api, t, **params):
    return await api.client.get("/v1/loops/usage", headers=t.headers, params=params)


WINDOW = {"start": "2026-11-02", "end": "2026-11-04T00:00:00Z"}


async def test_usage_by_run(api):
    assert api.runtime.settings.trainer_ranks == 1  # a CPU trainer holds one cpu unit per rank
    t, run_id = await seed(api)
    r = await usage(api, t, **WINDOW)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["group_by"] == "run" and body["start"].startswith("2026-11-02T00:00:00")
    totals = body["totals"]
    assert totals["worker_seconds"] == {"cpu": 91 * 60 + 40 * 60}
    assert totals["worker_seconds_by_kind"] == {"sampler": {"cpu": 40 * 60}, "trainer": {"cpu": 91 * 60}}
    assert totals["tokens_trained"] == 147 and totals["training_steps"] == 3
    assert totals["sampling"] == {
        "requests": 7,
        "errors": 1,
        "samples": 9,
        "prompt_tokens": 46,
        "completion_tokens": 78,
    }
    items = {i["kind"]: i for i in body["items"]}
    assert set(items) == {"run", "samplers"}
    run = items["run"]
    assert run["run_id"] == run_id and run["base_model"] == TEST_MODEL
    assert run["worker_seconds"] == {"cpu": 80 * 60}
    assert run["tokens_trained"] == 147 and run["sampling"]["requests"] == 5 and run["sampling"]["samples"] == 7
    smp = items["samplers"]
    assert smp["base_model"] == TEST_MODEL and smp["worker_seconds"] == {"cpu": 40 * 60}
    assert smp["sampling"]["requests"] == 2 and smp["sampling"]["completion_tokens"] == 20


async def test_usage_by_day_splits_at_midnight_and_sums_to_the_totals(api):
    t, _run_id = await seed(api)
    body = (await usage(api, t, group_by="day", **WINDOW)).json()
    days = {i["day"]: i for i in body["items"]}
    assert set(days) == {"2026-11-02", "2026-11-03"}
    assert days["2026-11-02"]["worker_seconds_by_kind"] == {"sampler": {"cpu": 40 * 60}, "trainer": {"cpu": 50 * 60}}
    assert days["2026-11-03"]["worker_seconds_by_kind"] == {"trainer": {"cpu": (10 + 31) * 60}}
    assert days["2026-11-02"]["tokens_trained"] == 140 and days["2026-11-03"]["tokens_trained"] == 7
    assert days["2026-11-02"]["sampling"]["requests"] == 6 and days["2026-11-03"]["sampling"]["requests"] == 1
    assert body["totals"]["worker_seconds"] == {"cpu": (91 + 40) * 60}
    assert body["totals"]["sampling"]["requests"] == 7


async def test_the_window_clips_and_another_org_sees_nothing(api):
    t, run_id = await seed(api)
    body = (await usage(api, t, start=m(30).isoformat(), end=m(60).isoformat())).json()
    assert body["totals"]["worker_seconds_by_kind"] == {"sampler": {"cpu": 1800}, "trainer": {"cpu": 1800}}
    assert body["totals"]["tokens_trained"] == 0  # its steps were at 15, 25 and 70 minutes
    # request counters are per minute: a window that starts inside a minute takes that minute
    body = (await usage(api, t, start=m(20.5).isoformat(), end=m(21).isoformat())).json()
    assert body["totals"]["sampling"]["requests"] == 4 and body["totals"]["sampling"]["samples"] == 5
    other = await api.tenant("globex")
    body = (await usage(api, other, **WINDOW)).json()
    assert body["items"] == [] and body["totals"]["worker_seconds"] == {}
    assert run_id not in str(body)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"start": "2026-11-03", "end": "2026-11-02"}, "start"),
        ({"start": "yesterday"}, "start"),
        ({"end": "2026-13-01"}, "end"),
        ({"start": "2024-01-01", "end": "2026-01-01"}, "start"),  # longer than 366 days
        ({"start": "2999-01-01", "end": "2999-01-02"}, "start"),  # the future
        ({"group_by": "week"}, "group_by"),
    ],
)
async def test_bad_parameters_name_their_field(api, params, field):
    t = await api.tenant("acme")
    r = await usage(api, t, **params)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field, r.json()


async def test_admin_usage_prints_the_same_report(api, services, data_dir):
    t, run_id = await seed(api)
    want = (await usage(api, t, **WINDOW)).json()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLOOPS_")}
    env.update(
        OPENLOOPS_DATABASE_URL=services.database_url,
        OPENLOOPS_REDIS_URL=services.redis_url,
        OPENLOOPS_DATA_DIR=str(data_dir),
        OPENLOOPS_MODEL_CATALOG_PATH=str(api.runtime.settings.model_catalog_path),
        COLUMNS="250",  # one table row per line
    )

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "control_plane.cli.main", "admin", "usage", "--org", "acme", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    r = admin("--since", WINDOW["start"], "--until", WINDOW["end"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == want
    r = admin("--since", WINDOW["start"], "--until", WINDOW["end"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    run_line = next(line for line in lines if f"run {run_id}" in line)
    assert "cpu 1.333" in run_line and "147" in run_line  # 80 minutes; tokens trained
    total = next(line for line in lines if "total" in line)
    assert "cpu 2.183" in total  # 131 minutes
    r = admin("--group-by", "week")
    assert r.returncode == 1 and "group_by must be one of run, day" in r.stderr
