"""Per-minute request counters of a resource's serving route, without a database write per
request.

Each API process aggregates in memory: per (resource, minute) the count of each status class,
a latency histogram and the most requests it had in flight at once. A background task
(:meth:`RequestMeter.run_forever`) adds what accumulated to the ``request_buckets`` rows every
``metrics_flush_seconds`` (one upsert per resource and minute), and on shutdown. Several API
replicas add into the same rows; concurrency is each replica's peak, summed (an upper bound of
the true peak). Sampling requests also add the samples and tokens the server reported
(:class:`Tokens`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import func, literal_column
from sqlalchemy.dialects.postgresql import insert

from control_plane.db.engine import Database
from control_plane.db.models import RequestBucket

log = structlog.get_logger("openloops.metering")

# upper bounds (ms) of the latency histogram buckets; one overflow bucket follows
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
Key = tuple[str, str, int]  # resource type, resource id, minute (epoch seconds // 60)
# resource types of sampling counters: a run's samplers, or a sampler of no run (a base model)
RUN_SAMPLING = "run"
SAMPLER_SAMPLING = "sampler"


def sampling_resource(run_id: str | None, sampler_id: str) -> tuple[str, str]:
    """Where one sampling request is counted: for its run, else for its sampler."""
    return (RUN_SAMPLING, run_id) if run_id is not None else (SAMPLER_SAMPLING, sampler_id)


@dataclass
class Tokens:
    """What one sampling request produced: sequences, and prompt / generated tokens."""

    samples: int = 0
    prompt: int = 0
    completion: int = 0

    @classmethod
    def of_completion(cls, answer: Any) -> Tokens | None:
        """From an OpenAI-style JSON answer (``choices``, ``usage``); None when it has neither."""
        if not isinstance(answer, dict):
            return None
        usage = answer.get("usage")
        choices = answer.get("choices")
        if not isinstance(usage, dict) and not isinstance(choices, list):
            return None
        return cls.of_usage(usage, samples=len(choices) if isinstance(choices, list) else 0)

    @classmethod
    def of_usage(cls, usage: Any, *, samples: int) -> Tokens:
        """From an OpenAI ``usage`` object (anything else counts no tokens)."""
        usage = usage if isinstance(usage, dict) else {}
        return cls(
            samples=samples,
            prompt=_count(usage.get("prompt_tokens")),
            completion=_count(usage.get("completion_tokens")),
        )


class TokenTap:
    """Reads what a proxied OpenAI-style answer produced as its bytes pass through: a JSON
    answer's ``choices`` and ``usage``; a server-sent event stream's last ``usage`` chunk (sent
    when the request asked for it with ``stream_options.include_usage``; otherwise the stream's
    tokens are not counted) with ``samples`` the request's ``n``. Holds at most
    :data:`TAP_LIMIT` bytes (a JSON answer past that is not counted; of a stream, its tail)."""

    def __init__(self, content_type: str | None, requested_n: int = 1) -> None:
        self.stream = (content_type or "").startswith("text/event-stream")
        self.json = not self.stream and "json" in (content_type or "")
        self.n = requested_n
        self._buf = bytearray()
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        if not (self.stream or self.json) or self._overflow:
            return
        self._buf += chunk
        if len(self._buf) > TAP_LIMIT:
            if self.json:
                self._overflow, self._buf = True, bytearray()
            else:
                del self._buf[: len(self._buf) - TAP_TAIL]

    def tokens(self) -> Tokens | None:
        if self._overflow or not self._buf:
            return None
        if self.json:
            try:
                return Tokens.of_completion(json.loads(self._buf))
            except ValueError:
                return None
        for line in reversed(bytes(self._buf).splitlines()):
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    usage = json.loads(line[5:]).get("usage")
                except (ValueError, AttributeError):
                    continue
                if isinstance(usage, dict):
                    return Tokens.of_usage(usage, samples=self.n)
        return Tokens(samples=self.n)


TAP_LIMIT = 4 << 20
TAP_TAIL = 64 << 10


def _count(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


@dataclass
class _Bucket:
    c2: int = 0
    c4: int = 0
    c5: int = 0
    max_concurrent: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    samples: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: _Bucket) -> None:
        """Fold ``other`` in (concurrency: the higher peak)."""
        self.c2, self.c4, self.c5 = self.c2 + other.c2, self.c4 + other.c4, self.c5 + other.c5
        self.max_concurrent = max(self.max_concurrent, other.max_concurrent)
        self.hist = [x + y for x, y in zip(self.hist, other.hist, strict=True)]
        self.samples += other.samples
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


def latency_bucket(ms: float) -> int:
    return next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if ms <= b), len(LATENCY_BUCKETS_MS))


class RequestMeter:
    def __init__(self, db: Database, flush_seconds: float) -> None:
        self._db = db
        self._flush_seconds = flush_seconds
        self._buckets: dict[Key, _Bucket] = {}
        self._in_flight: dict[tuple[str, str], int] = {}

    @contextlib.contextmanager
    def track(self, resource_type: str, resource_id: str) -> Iterator[Outcome]:
        """Count one request: ``with meter.track("deployment", dep_id) as out: ...; out.status
        = 202``. The request is counted when the block exits (5xx when it raised and no status
        was set); ``out.skip = True`` leaves it out (a long poll that only timed out)."""
        key = (resource_type, resource_id)
        now = self._in_flight.get(key, 0) + 1
        self._in_flight[key] = now
        bucket = self._bucket(resource_type, resource_id)
        bucket.max_concurrent = max(bucket.max_concurrent, now)
        out = Outcome()
        t0 = time.perf_counter()
        try:
            yield out
        except BaseException:
            if out.status is None:
                out.status = 500
            raise
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
            if not out.skip:
                ms = (time.perf_counter() - t0) * 1000
                self.record(resource_type, resource_id, out.status or 200, ms, out.tokens)

    def record(
        self, resource_type: str, resource_id: str, status: int, latency_ms: float, tokens: Tokens | None = None
    ) -> None:
        b = self._bucket(resource_type, resource_id)
        if tokens is not None:
            b.samples += tokens.samples
            b.prompt_tokens += tokens.prompt
            b.completion_tokens += tokens.completion
        cls = status // 100
        if cls >= 5:
            b.c5 += 1
        elif cls == 4:
            b.c4 += 1
        else:
            b.c2 += 1
        b.hist[latency_bucket(latency_ms)] += 1

    def _bucket(self, resource_type: str, resource_id: str) -> _Bucket:
        key = (resource_type, resource_id, int(time.time() // 60))
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket()
        return b

    async def flush(self) -> int:
        """Add what accumulated to the database; returns the number of rows written."""
        pending, self._buckets = self._buckets, {}
        if not pending:
            return 0
        rows = [
            {
                "resource_type": rt,
                "resource_id": rid,
                "bucket_start": datetime.fromtimestamp(minute * 60, UTC),
                "count_2xx": b.c2,
                "count_4xx": b.c4,
                "count_5xx": b.c5,
                "max_concurrent": b.max_concurrent,
                "latency_hist": b.hist,
                "samples": b.samples,
                "prompt_tokens": b.prompt_tokens,
                "completion_tokens": b.completion_tokens,
            }
            for (rt, rid, minute), b in pending.items()
        ]
        stmt = insert(RequestBucket).values(rows)
        ex = stmt.excluded
        stmt = stmt.on_conflict_do_update(
            index_elements=[RequestBucket.resource_type, RequestBucket.resource_id, RequestBucket.bucket_start],
            set_={
                "count_2xx": RequestBucket.count_2xx + ex.count_2xx,
                "count_4xx": RequestBucket.count_4xx + ex.count_4xx,
                "count_5xx": RequestBucket.count_5xx + ex.count_5xx,
                "max_concurrent": RequestBucket.max_concurrent + ex.max_concurrent,
                "samples": RequestBucket.samples + ex.samples,
                "prompt_tokens": RequestBucket.prompt_tokens + ex.prompt_tokens,
                "completion_tokens": RequestBucket.completion_tokens + ex.completion_tokens,
                # element-wise sum of the two histograms
                "latency_hist": func.array(
                    literal_column(
                        "SELECT a + b FROM unnest(request_buckets.latency_hist, excluded.latency_hist) AS t(a, b)"
                    )
                ),
            },
        )
        try:
            async with self._db.transaction() as s:
                await s.execute(stmt)
        except Exception:
            # keep the counts for the next flush rather than lose them
            for key, b in pending.items():
                self._buckets.setdefault(key, _Bucket()).add(b)
            raise
        return len(rows)

    async def run_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._flush_seconds)
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - database blip: counts are kept, try again
                log.warning("request meter flush failed; retrying", error=str(exc))


@dataclass
class Outcome:
    """What :meth:`RequestMeter.track` records when its block exits."""

    status: int | None = None
    skip: bool = False
    tokens: Tokens | None = None
