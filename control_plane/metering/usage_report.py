"""An org's usage over a window: what ``GET /v1/loops/usage`` and ``openloops admin usage``
report.

- **Worker-seconds by GPU type**: the observed running intervals of each workload
  (:mod:`.lifetimes`, from the status history) times the units it holds
  (:mod:`control_plane.services.capacity_units`, the arithmetic capacity uses): a trainer
  (deployment) its GPUs × nodes × replicas, or one ``cpu`` unit per rank; a sampler server its
  sampler GPUs — the org's samplers of one base model share one server, so their intervals are
  merged before counting; a served model its own server. A model no longer in the catalog
  counts one unit of type ``unknown``.
- **Tokens trained**: the ``tokens`` of the run's training-metric steps in the window (the
  telemetry; its retention, ``OPENLOOPS_TRAINING_METRICS_RETENTION_DAYS``, bounds how far back).
- **Sampling**: requests, samples, prompt and generated tokens of the sampling request counters
  (per run; samplers of no run per base model). **Served**: the same of served models. Those
  counters are per minute: a window takes every minute it touches.

``group_by=run`` gives one item per run (its trainer's share: the deployment's intervals while
the run was attached to it, from its creation until it ended), per base model for samplers
(their server and the sampling no run owns), and per served model; ``group_by=day`` one item
per UTC day. ``totals`` counts every workload in full, so it can exceed the sum of the run
items (a deployment between runs).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, Numeric, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.catalog import ModelCatalog
from control_plane.db.models import Deployment, RequestBucket, Run, Sampler, ServedModel, StatusHistory, TrainingMetric
from control_plane.errors import InvalidInput
from control_plane.metering import lifetimes
from control_plane.metering.requests import RUN_SAMPLING, SAMPLER_SAMPLING
from control_plane.services.capacity_units import sampler_units, trainer_units
from control_plane.services.deployments import RESOURCE as DEPLOYMENT
from control_plane.services.served_models import RESOURCE as SERVED_MODEL
from control_plane.statuses import Status

SAMPLER = "sampler"
UNKNOWN = "unknown"  # the GPU type of a model no longer in the catalog
MAX_WINDOW = timedelta(days=366)
DEFAULT_WINDOW = timedelta(days=30)
GROUPS = ("run", "day")
ENDED = (Status.INACTIVE.value, Status.FAILED.value)


@dataclass
class Counts:
    """What one item (or the totals) holds."""

    worker_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))  # by GPU type
    worker_seconds_by_kind: defaultdict[str, defaultdict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    tokens_trained: int = 0
    training_steps: int = 0
    sampling: Counter[str] = field(default_factory=Counter)  # requests, samples, prompt/completion tokens
    served: Counter[str] = field(default_factory=Counter)

    def add_seconds(self, kind: str, units: Counter[str], secs: float) -> None:
        if secs <= 0:
            return
        for gpu_type, n in units.items():
            self.worker_seconds[gpu_type] += n * secs
            self.worker_seconds_by_kind[kind][gpu_type] += n * secs

    def json(self) -> dict[str, Any]:
        return {
            "worker_seconds": _rounded(self.worker_seconds),
            "worker_seconds_by_kind": {k: _rounded(v) for k, v in sorted(self.worker_seconds_by_kind.items()) if v},
            "tokens_trained": self.tokens_trained,
            "training_steps": self.training_steps,
            "sampling": _requests(self.sampling),
            "served": _requests(self.served),
        }

    def empty(self) -> bool:
        return not (
            any(v > 0 for v in self.worker_seconds.values())
            or self.training_steps
            or self.sampling["requests"]
            or self.served["requests"]
        )


REQUEST_KEYS = ("requests", "errors", "samples", "prompt_tokens", "completion_tokens")


def _requests(c: Counter[str]) -> dict[str, int]:
    return {k: int(c[k]) for k in REQUEST_KEYS}


def _rounded(c: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in sorted(c.items()) if v > 0}


@dataclass(frozen=True)
class UsageWindow:
    start: datetime
    end: datetime
    group_by: str

    @classmethod
    def parse(
        cls, start: str | None, end: str | None, group_by: str | None, *, now: datetime | None = None
    ) -> UsageWindow:
        """``start``/``end``: ISO 8601 dates or datetimes (UTC when they name no zone);
        default the last 30 days; at most 366 days."""
        now = now or datetime.now(UTC)
        e = _when(end, "end") if end else now
        s = _when(start, "start") if start else e - DEFAULT_WINDOW
        if s >= e:
            raise InvalidInput("start must be before end", field="start")
        if e - s > MAX_WINDOW:
            raise InvalidInput(f"the window is longer than {MAX_WINDOW.days} days", field="start")
        g = group_by or "run"
        if g not in GROUPS:
            raise InvalidInput(f"group_by must be one of {', '.join(GROUPS)}", field="group_by")
        e = min(e, now)  # nothing ran in the future: an ongoing workload counts until now
        if s >= e:
            raise InvalidInput("start must be in the past", field="start")
        return cls(s, e, g)


def _when(text: str, name: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00")) if "T" in text else None
        if t is None:
            d = date.fromisoformat(text)
            t = datetime(d.year, d.month, d.day)
    except ValueError:
        raise InvalidInput(f"{name} must be an ISO 8601 date or date-time, got {text[:64]!r}", field=name) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


@dataclass(frozen=True)
class UsagePolicy:
    catalog: ModelCatalog
    trainer_ranks: int

    def trainer(self, base_model: str, replicas: int) -> Counter[str]:
        m = self.catalog.find(base_model)
        return trainer_units(m, replicas, self.trainer_ranks) if m else Counter({UNKNOWN: max(1, replicas)})

    def sampler(self, base_model: str) -> Counter[str]:
        m = self.catalog.find(base_model)
        return sampler_units(m) if m else Counter({UNKNOWN: 1})


class _Report:
    def __init__(self, w: UsageWindow) -> None:
        self.w = w
        self.totals = Counts()
        self.items: dict[tuple[str, str], Counts] = defaultdict(Counts)
        self.meta: dict[tuple[str, str], dict[str, Any]] = {}

    def workload(
        self,
        key: tuple[str, str] | None,
        kind: str,
        units: Counter[str],
        spans: list[lifetimes.Interval],
        *,
        total: bool = True,
    ) -> None:
        """Worker-seconds of ``spans`` (clipped to the window): grouped by day, into each
        day's item (when they count in the totals); by run, into the totals (``total``) and
        into ``key``'s item."""
        spans = lifetimes.clip(spans, self.w.start, self.w.end)
        if self.w.group_by == "day":
            if total:
                for day, secs in lifetimes.by_day(spans).items():
                    self.items[("day", day.isoformat())].add_seconds(kind, units, secs)
            return
        if total:
            self.totals.add_seconds(kind, units, lifetimes.seconds(spans))
        if key is not None:
            self.items[key].add_seconds(kind, units, lifetimes.seconds(spans))

    def counted(self, key: tuple[str, str], day: date) -> list[Counts]:
        """Where a counter of ``key`` on ``day`` goes: the day's item, or the key's item and
        the totals."""
        if self.w.group_by == "day":
            return [self.items[("day", day.isoformat())]]
        return [self.items[key], self.totals]


async def usage_report(s: AsyncSession, policy: UsagePolicy, org_id: str, w: UsageWindow) -> dict[str, Any]:
    """The report (the shape ``GET /v1/loops/usage`` answers)."""
    r = _Report(w)
    intervals = await _intervals(s, org_id, w.end)
    await _trainers(s, r, policy, org_id, intervals)
    await _samplers(s, r, policy, org_id, intervals)
    await _served(s, r, policy, org_id, intervals)
    await _training(s, r, org_id)
    await _sampling(s, r, org_id)
    # totals: the sum of the day items, or (by run) every workload in full
    if w.group_by == "day":
        for c in r.items.values():
            _fold(r.totals, c)
    items = []
    for key in sorted(r.items, key=lambda k: (k[0] != "day", k[0], k[1])):
        c = r.items[key]
        if c.empty() and key[0] != "day":
            continue
        items.append({**_describe(key), **r.meta.get(key, {}), **c.json()})
    return {
        "org_id": org_id,
        "start": w.start.isoformat(),
        "end": w.end.isoformat(),
        "group_by": w.group_by,
        "items": items,
        "totals": r.totals.json(),
    }


def _describe(key: tuple[str, str]) -> dict[str, Any]:
    kind, ident = key
    if kind == "day":
        return {"day": ident}
    if kind == "run":
        return {"kind": "run", "run_id": ident}
    if kind == SAMPLER:
        return {"kind": "samplers", "base_model": ident}
    return {"kind": "served_model", "served_model_id": ident}


def _fold(into: Counts, c: Counts) -> None:
    for gpu_type, secs in c.worker_seconds.items():
        into.worker_seconds[gpu_type] += secs
    for kind, by_type in c.worker_seconds_by_kind.items():
        for gpu_type, secs in by_type.items():
            into.worker_seconds_by_kind[kind][gpu_type] += secs
    into.tokens_trained += c.tokens_trained
    into.training_steps += c.training_steps
    into.sampling.update(c.sampling)
    into.served.update(c.served)


async def _intervals(s: AsyncSession, org_id: str, until: datetime) -> dict[tuple[str, str], list[lifetimes.Interval]]:
    """Running intervals of every deployment, sampler and served model of the org that changed
    status before ``until``."""
    h = StatusHistory
    rows = await s.execute(
        select(h.resource_type, h.resource_id, h.created_at, h.to_status)
        .where(h.org_id == org_id, h.resource_type.in_([DEPLOYMENT, SAMPLER, SERVED_MODEL]), h.created_at < until)
        .order_by(h.resource_type, h.resource_id, h.created_at, h.id)
    )
    changes: dict[tuple[str, str], list[tuple[datetime, str]]] = defaultdict(list)
    for rtype, rid, at, to in rows:
        changes[(rtype, rid)].append((at, to))
    return {k: lifetimes.running_intervals(v, until) for k, v in changes.items()}


async def _trainers(
    s: AsyncSession, r: _Report, policy: UsagePolicy, org_id: str, intervals: dict[tuple[str, str], list[Any]]
) -> None:
    deps = {
        d.id: d
        for d in (
            await s.execute(select(Deployment).where(Deployment.org_id == org_id, Deployment.created_at < r.w.end))
        ).scalars()
    }
    for dep in deps.values():
        units = policy.trainer(dep.base_model, dep.replicas)
        r.workload(None, "trainer", units, intervals.get((DEPLOYMENT, dep.id), []))
    if r.w.group_by != "run":
        return
    # each run: its deployment's intervals while it was attached (creation .. end)
    ended = dict(
        (
            await s.execute(
                select(StatusHistory.resource_id, func.min(StatusHistory.created_at))
                .where(
                    StatusHistory.org_id == org_id,
                    StatusHistory.resource_type == "run",
                    StatusHistory.to_status.in_(ENDED),
                )
                .group_by(StatusHistory.resource_id)
            )
        ).all()
    )
    runs = (
        await s.execute(
            select(Run.id, Run.name, Run.base_model, Run.deployment_id, Run.created_at).where(
                Run.org_id == org_id, Run.created_at < r.w.end, Run.deployment_id.is_not(None)
            )
        )
    ).all()
    for run_id, name, base_model, dep_id, created in runs:
        ran_on = deps.get(dep_id or "")
        if ran_on is None:
            continue
        spans = lifetimes.clip(intervals.get((DEPLOYMENT, ran_on.id), []), created, ended.get(run_id) or r.w.end)
        units = policy.trainer(ran_on.base_model, ran_on.replicas)
        r.workload(("run", run_id), "trainer", units, spans, total=False)
        r.meta[("run", run_id)] = {"name": name, "base_model": base_model}


async def _samplers(
    s: AsyncSession, r: _Report, policy: UsagePolicy, org_id: str, intervals: dict[tuple[str, str], list[Any]]
) -> None:
    """The org's samplers of one base model share one server: its intervals are their union."""
    by_model: dict[str, list[lifetimes.Interval]] = defaultdict(list)
    for sid, base_model in await s.execute(
        select(Sampler.id, Sampler.base_model).where(Sampler.org_id == org_id, Sampler.created_at < r.w.end)
    ):
        by_model[base_model] += intervals.get((SAMPLER, sid), [])
    for base_model, spans in by_model.items():
        r.workload((SAMPLER, base_model), "sampler", policy.sampler(base_model), lifetimes.union(spans))


async def _served(
    s: AsyncSession, r: _Report, policy: UsagePolicy, org_id: str, intervals: dict[tuple[str, str], list[Any]]
) -> None:
    for sm_id, name, base_model in await s.execute(
        select(ServedModel.id, ServedModel.name, ServedModel.base_model).where(
            ServedModel.org_id == org_id, ServedModel.created_at < r.w.end
        )
    ):
        spans = intervals.get((SERVED_MODEL, sm_id), [])
        r.workload((SERVED_MODEL, sm_id), "served_model", policy.sampler(base_model), spans)
        r.meta[(SERVED_MODEL, sm_id)] = {"name": name, "base_model": base_model}


def _day(col: Any) -> Any:
    return cast(func.timezone(literal_column("'UTC'"), col), Date)


async def _training(s: AsyncSession, r: _Report, org_id: str) -> None:
    tm = TrainingMetric
    rows = await s.execute(
        select(
            tm.run_id,
            _day(tm.time),
            func.coalesce(func.sum(cast(tm.metrics["tokens"].astext, Numeric)), 0),
            func.count(),
        )
        .where(tm.org_id == org_id, tm.time >= r.w.start, tm.time < r.w.end)
        .group_by(tm.run_id, _day(tm.time))
    )
    for run_id, day, tokens, steps in rows:
        for c in r.counted(("run", run_id), day):
            c.tokens_trained += int(tokens)
            c.training_steps += int(steps)


async def _sampling(s: AsyncSession, r: _Report, org_id: str) -> None:
    b = RequestBucket
    sums = (
        func.sum(b.count_2xx + b.count_4xx + b.count_5xx),
        func.sum(b.count_4xx + b.count_5xx),
        func.sum(b.samples),
        func.sum(b.prompt_tokens),
        func.sum(b.completion_tokens),
    )
    # the counters are per minute: the window takes every minute it touches
    first_minute = r.w.start.replace(second=0, microsecond=0)
    window = (b.bucket_start >= first_minute, b.bucket_start < r.w.end)
    sources = (
        (RUN_SAMPLING, Run, Run.id, lambda row: ("run", row)),
        (SAMPLER_SAMPLING, Sampler, Sampler.base_model, lambda row: (SAMPLER, row)),
        (SERVED_MODEL, ServedModel, ServedModel.id, lambda row: (SERVED_MODEL, row)),
    )
    for rtype, model, key_col, key_of in sources:
        rows = await s.execute(
            select(key_col, _day(b.bucket_start), *sums)
            .join(model, model.id == b.resource_id)
            .where(b.resource_type == rtype, model.org_id == org_id, *window)
            .group_by(key_col, _day(b.bucket_start))
        )
        for ident, day, *vals in rows:
            counts = dict(zip(REQUEST_KEYS, (int(v or 0) for v in vals), strict=True))
            for c in r.counted(key_of(ident), day):
                (c.served if rtype == SERVED_MODEL else c.sampling).update(counts)
