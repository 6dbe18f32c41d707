"""A Loops sampler's ``base_url``: ``/v1/loops/samplers/{id}/openai/v1`` (OpenAI-compatible).

``POST .../completions`` and ``.../chat/completions`` are forwarded to the sampler's shared
vLLM server with ``model`` replaced by what the sampler serves (its pinned checkpoint's
adapter, its run's latest sampler weights, or the base model), so any ``model`` value the
client sends works. The answer is vLLM's, with ``model`` set back to what the client sent (or
the sampler id). Authenticated like every Loops route; another org's sampler is a 404.
"""

from __future__ import annotations

from typing import Any

from litestar import MediaType, Response

from control_plane.auth.principal import Principal
from control_plane.errors import InvalidInput
from control_plane.sampling.client import VLLMClient
from control_plane.sampling.dispatcher import SamplingDispatcher
from control_plane.services.samplers import SamplerTarget


def models_json(target: SamplerTarget) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": target.sampler_id, "object": "model", "owned_by": "openloops", "root": target.base_model}],
    }


async def forward(
    d: SamplingDispatcher, principal: Principal, sampler_id: str, path: str, data: dict[str, Any]
) -> Response[Any]:
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    if data.get("stream"):
        raise InvalidInput("stream=true is not supported by this route; send stream=false", field="stream")
    target = await d.target(principal.org_id, sampler_id)
    asked = data.get("model") or target.sampler_id
    body = {**data, "model": target.model}

    async def call(client: VLLMClient, t: SamplerTarget) -> tuple[int, Any]:
        return await client.forward_json(path, body)

    status, payload = await d.run_direct(target, call)  # type: ignore[misc]
    if isinstance(payload, dict) and "model" in payload:
        payload["model"] = asked
    return Response(payload, status_code=status, media_type=MediaType.JSON)
