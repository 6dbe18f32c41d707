"""A served model checked against the trainer.

When a served model first serves (the controller calls :func:`verify_served_model` in the
background), each of its checkpoints' probe sequence (recorded by the trainer at save time in
``openloops_checkpoint.json``, :mod:`data_plane.wire.probe`) is sent to its vLLM server as a
prompt, and the prompt logprobs vLLM computes with the served adapter are compared with the
trainer's. The largest difference is stored per checkpoint (``max_abs_delta``); the served
model's ``verification`` becomes ``ok``, ``flagged`` (some checkpoint beyond
``served_model_verify_max_delta``, named in its status reason), ``unverified`` (no checkpoint
carries a probe: imported, or saved by an older trainer) or ``error`` (the server did not
answer; the detail says why)."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import select

from control_plane.db.models import Checkpoint, ServedModel, ServedModelCheckpoint
from control_plane.sampling.client import VLLMClient
from control_plane.sampling.errors import SamplingError
from control_plane.sampling.translate import prompt_logprob_entries, prompt_token_logprobs
from data_plane.storage.base import ObjectNotFound, StoreError
from data_plane.wire.probe import parse_probe

if TYPE_CHECKING:
    from control_plane.runtime import Runtime

log = structlog.get_logger("openloops.served_verify")

METADATA_FILE = "openloops_checkpoint.json"
ATTEMPTS = 3


class ProbeUnavailable(Exception):
    """The checkpoint carries no probe to compare with."""


def max_abs_delta(a: list[float], b: list[float]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        d = abs(x - y)
        if math.isnan(d):
            return math.inf
        worst = max(worst, d)
    return worst


async def _probe_of(runtime: Runtime, storage_prefix: str) -> tuple[list[int], list[float]]:
    key = f"{storage_prefix.rstrip('/')}/{METADATA_FILE}"
    try:
        raw = await asyncio.to_thread(runtime.store.get_bytes, key)
        meta = json.loads(raw)
    except ObjectNotFound:
        raise ProbeUnavailable("no openloops_checkpoint.json (an imported adapter)") from None
    except (ValueError, StoreError) as exc:
        raise ProbeUnavailable(f"its metadata cannot be read: {exc}") from None
    probe = parse_probe(meta) if isinstance(meta, dict) else None
    if probe is None:
        raise ProbeUnavailable("no probe recorded (saved by a trainer before probes were recorded)")
    return probe


async def _served(client: VLLMClient, adapter: str, tokens: list[int]) -> list[float]:
    body = {"model": adapter, "prompt": tokens, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    last: Exception | None = None
    for attempt in range(ATTEMPTS):
        try:
            completion = await client.completions(body)
            entries = prompt_logprob_entries(completion.get("choices") or [], len(tokens))
            return [float(x) for x in prompt_token_logprobs(entries, tokens)[1:]]
        except SamplingError as exc:  # a server that just came up may still be loading the adapter
            last = exc
            await asyncio.sleep(1.0 * (attempt + 1))
    assert last is not None
    raise last


async def verify_served_model(runtime: Runtime, served_model_id: str, endpoint: str) -> str:
    """Verify every checkpoint of a serving served model; the verification it ends with."""
    bound = runtime.settings.served_model_verify_max_delta
    async with runtime.db.session() as s:
        rows = (
            await s.execute(
                select(ServedModelCheckpoint, Checkpoint.storage_prefix)
                .join(Checkpoint, Checkpoint.id == ServedModelCheckpoint.checkpoint_id)
                .where(ServedModelCheckpoint.served_model_id == served_model_id)
                .order_by(ServedModelCheckpoint.position)
            )
        ).all()
    results: dict[int, tuple[float | None, str]] = {}
    client = VLLMClient(endpoint, timeout_s=120.0)
    try:
        for member, prefix in rows:
            try:
                tokens, trainer = await _probe_of(runtime, prefix)
                served = await _served(client, member.adapter_name, tokens)
                delta = max_abs_delta(served, trainer)
                verdict = "ok" if delta <= bound else "flagged"
                results[member.position] = (
                    delta,
                    f"{verdict}: max |served - trainer| logprob {delta:.3g} (bound {bound:g})",
                )
            except ProbeUnavailable as exc:
                results[member.position] = (None, f"unverified: {exc}")
            except (TimeoutError, SamplingError, OSError) as exc:
                results[member.position] = (None, f"error: {exc}"[:1000])
    finally:
        await client.aclose()
    verdicts = [d.split(":", 1)[0] for _, d in results.values()]
    overall = next((v for v in ("flagged", "error", "ok") if v in verdicts), "unverified")
    now = datetime.now(UTC)
    async with runtime.db.transaction() as s:
        sm = await s.get(ServedModel, served_model_id, with_for_update=True)
        if sm is None:
            return overall
        for member in (
            await s.execute(select(ServedModelCheckpoint).where(ServedModelCheckpoint.served_model_id == sm.id))
        ).scalars():
            if member.position in results:
                member.max_abs_delta, member.verify_detail = results[member.position]
                member.verified_at = now
        sm.verification, sm.verified_at = overall, now
        if overall == "flagged":
            worst = [
                f"{m.model_name} ({d:.3g})" for m, _ in rows if (d := results[m.position][0]) is not None and d > bound
            ]
            sm.status_reason = f"verification flagged: served logprobs differ from the trainer's beyond {bound:g} for {', '.join(worst)}"
    log.info("served model verified", id=served_model_id, verification=overall, results=results)
    return overall
