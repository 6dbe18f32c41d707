"""A thin async client for a vLLM sampler's public OpenAI-compatible HTTP API (httpx only).

Used by the API server to run Tinker ``asample`` requests and by the controller to probe
sampler health. One :class:`VLLMClient` per sampler endpoint; it is safe to share between
tasks. Errors come out as :mod:`control_plane.sampling.errors` types, never httpx ones.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from control_plane.sampling.errors import (
    AdapterLoadFailed,
    AdapterNotFound,
    InvalidSampleRequest,
    SamplerBusy,
    SamplerFailed,
    SamplerUnavailable,
    SamplingError,
)
from control_plane.sampling.translate import (
    SampleSpec,
    build_completion_body,
    completion_to_sample_response,
    parse_sample_request,
)


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    parent: str | None = None  # base model name for an adapter, None for the base model
    root: str | None = None
    max_model_len: int | None = None

    @property
    def is_adapter(self) -> bool:
        return self.parent is not None


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping):
            return str(err.get("message") or err)
        if isinstance(body.get("detail"), (str, list)):
            return str(body["detail"])
        return str(err)
    return str(body)[:500]


def map_http_error(resp: httpx.Response, *, model: str | None = None) -> SamplingError:
    """Our exception for a non-2xx vLLM answer."""
    status = resp.status_code
    msg = _error_message(resp)
    if status == 404:
        what = f"model or adapter {model!r}" if model else "resource"
        return AdapterNotFound(f"sampler does not know {what}: {msg}", upstream_status=status)
    if status == 400 and "could not be loaded" in msg:
        return AdapterLoadFailed(f"adapter {model!r} exists but the sampler could not load it: {msg}",
                                 upstream_status=status)
    if status in (400, 422):
        return InvalidSampleRequest(f"sampler rejected the request: {msg}", upstream_status=status)
    if status in (429, 503):
        return SamplerBusy(f"sampler is saturated or not ready (HTTP {status}): {msg}", upstream_status=status)
    if status >= 500 and ("EngineCore" in msg or "EngineDead" in msg):
        return SamplerUnavailable(f"sampler engine died: {msg}", upstream_status=status)
    return SamplerFailed(f"sampler failed (HTTP {status}): {msg}", upstream_status=status)


class VLLMClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        max_in_flight: int | None = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``max_in_flight`` bounds concurrent completions through this client; one more raises
        :class:`SamplerBusy` at once (the API answers 429 and the SDK backs off)."""
        self.base_url = base_url.rstrip("/")
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self._max_model_len: int | None = None
        limits = httpx.Limits(
            max_connections=max_in_flight or 256,
            max_keepalive_connections=min(max_in_flight or 256, 64),
            # below uvicorn's 5 s keep-alive in vLLM: never reuse a connection it is closing
            keepalive_expiry=2.0,
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=limits,
            transport=transport,
            trust_env=False,
        )

    async def __aenter__(self) -> VLLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ----------------------------------------------------------------- transport

    async def _request(self, method: str, path: str, *, json_body: Any = None, timeout: float | None = None,
                       model: str | None = None) -> httpx.Response:
        kw: dict[str, Any] = {}
        if json_body is not None:
            kw["content"] = msgspec.json.encode(json_body)
            kw["headers"] = {"content-type": "application/json"}
        if timeout is not None:
            kw["timeout"] = timeout
        try:
            try:
                resp = await self._http.request(method, path, **kw)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                # a pooled keep-alive connection the server closed at the same moment: once
                # more on a fresh one (sampling is stateless); a dead server fails again
                resp = await self._http.request(method, path, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise SamplerUnavailable(f"sampler at {self.base_url} is not reachable: {e!r}") from e
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise SamplerUnavailable(f"connection to sampler at {self.base_url} broke: {e!r}") from e
        except httpx.TimeoutException as e:
            raise SamplerFailed(f"sampler at {self.base_url} timed out on {method} {path}: {e!r}") from e
        except httpx.HTTPError as e:
            raise SamplerFailed(f"HTTP error talking to sampler at {self.base_url}: {e!r}") from e
        if resp.status_code >= 300:
            raise map_http_error(resp, model=model)
        return resp

    # ----------------------------------------------------------------- probes

    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when ``GET /health`` answers 200 (engine alive); False on anything else."""
        try:
            resp = await self._http.get("/health", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def wait_healthy(self, timeout_s: float, interval_s: float = 0.5) -> float:
        """Poll ``/health`` until it answers 200; seconds waited. Raises SamplerUnavailable."""
        start = time.monotonic()
        while True:
            if await self.health(timeout_s=min(5.0, max(0.5, timeout_s))):
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise SamplerUnavailable(f"sampler at {self.base_url} not healthy after {timeout_s:.0f} s")
            await asyncio.sleep(interval_s)

    async def list_models(self) -> list[ModelCard]:
        """The base model and every adapter currently loaded (``GET /v1/models``)."""
        resp = await self._request("GET", "/v1/models", timeout=30.0)
        cards = []
        for m in resp.json().get("data", []):
            cards.append(ModelCard(id=m["id"], parent=m.get("parent"), root=m.get("root"),
                                   max_model_len=m.get("max_model_len")))
        return cards

    async def max_model_len(self) -> int | None:
        if self._max_model_len is None:
            for card in await self.list_models():
                if not card.is_adapter and card.max_model_len:
                    self._max_model_len = int(card.max_model_len)
                    break
        return self._max_model_len

    async def unload_adapter(self, name: str) -> bool:
        """Forget a loaded adapter (e.g. its checkpoint was deleted). False if it was not loaded."""
        try:
            await self._request("POST", "/v1/unload_lora_adapter", json_body={"lora_name": name}, model=name)
        except AdapterNotFound:
            return False
        return True

    async def forward_json(self, path: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        """POST ``body`` to an OpenAI-compatible route of the server and return its status and
        JSON as they are (for the authenticated proxy). Only transport failures raise."""
        try:
            resp = await self._http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise SamplerUnavailable(f"sampler at {self.base_url} is not reachable: {e!r}") from e
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise SamplerUnavailable(f"connection to sampler at {self.base_url} broke: {e!r}") from e
        except httpx.HTTPError as e:
            raise SamplerFailed(f"HTTP error talking to sampler at {self.base_url}: {e!r}") from e
        try:
            return resp.status_code, resp.json()
        except ValueError:
            return resp.status_code, {"error": {"message": resp.text[:500], "code": resp.status_code}}

    # ----------------------------------------------------------------- sampling

    async def completions(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``/v1/completions`` (non-streaming); the JSON answer."""
        if self.max_in_flight is not None and self._in_flight >= self.max_in_flight:
            raise SamplerBusy(f"sampler at {self.base_url} has {self._in_flight} requests in flight")
        self._in_flight += 1
        try:
            resp = await self._request("POST", "/v1/completions", json_body=body, model=body.get("model"))
        finally:
            self._in_flight -= 1
        try:
            return msgspec.json.decode(resp.content)  # type: ignore[no-any-return]
        except msgspec.DecodeError as e:
            raise SamplerFailed(f"sampler answered non-JSON: {resp.text[:200]!r}") from e

    async def sample(self, request: Mapping[str, Any] | SampleSpec, *, model: str,
                     request_id: str | None = None) -> bytes:
        """Run one Tinker ``asample`` body against ``model`` (the served base-model name, or an
        adapter's LoRA name); the serialized ``SampleResponse`` protobuf."""
        spec = request if isinstance(request, SampleSpec) else parse_sample_request(request)
        mml = await self.max_model_len() if spec.max_tokens is None else None
        body = build_completion_body(spec, model=model, max_model_len=mml, request_id=request_id)
        return completion_to_sample_response(spec, await self.completions(body))
