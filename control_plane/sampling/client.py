"""A thin async client for a vLLM sampler's public OpenAI-compatible HTTP API (aiohttp).

Used by the API server to run Tinker ``asample`` requests and by the controller to probe
sampler health. One :class:`VLLMClient` per sampler endpoint; it is safe to share between
tasks. Errors come out as :mod:`control_plane.sampling.errors` types, never aiohttp ones.

aiohttp rather than httpx: with 64 completions in flight per server, httpx's connection pool
spends ~13 ms of CPU per request (its request-to-connection assignment is quadratic in the
requests waiting); aiohttp spends ~0.3 ms. On a machine where the API shares cores with a CPU
vLLM, that CPU comes straight out of sampling throughput (bench/sampling.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from control_plane.metering.requests import Tokens
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


@dataclass(frozen=True, slots=True)
class Reply:
    """A vLLM answer, read in full (the connection is back in the pool)."""

    status: int
    body: bytes
    reason: str = ""

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def _error_message(resp: Reply) -> str:
    try:
        body = resp.json()
    except msgspec.DecodeError:
        return resp.text[:500] or resp.reason
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping):
            return str(err.get("message") or err)
        if isinstance(body.get("detail"), (str, list)):
            return str(body["detail"])
        return str(err)
    return str(body)[:500]


def map_http_error(resp: Reply, *, model: str | None = None) -> SamplingError:
    """Our exception for a non-2xx vLLM answer."""
    status = resp.status
    msg = _error_message(resp)
    if status == 404:
        what = f"model or adapter {model!r}" if model else "resource"
        return AdapterNotFound(f"sampler does not know {what}: {msg}", upstream_status=status)
    if status == 400 and "could not be loaded" in msg:
        return AdapterLoadFailed(
            f"adapter {model!r} exists but the sampler could not load it: {msg}", upstream_status=status
        )
    if status in (400, 422):
        return InvalidSampleRequest(f"sampler rejected the request: {msg}", upstream_status=status)
    if status in (429, 503):
        return SamplerBusy(f"sampler is saturated or not ready (HTTP {status}): {msg}", upstream_status=status)
    if status >= 500 and ("EngineCore" in msg or "EngineDead" in msg):
        return SamplerUnavailable(f"sampler engine died: {msg}", upstream_status=status)
    return SamplerFailed(f"sampler failed (HTTP {status}): {msg}", upstream_status=status)


# a pooled keep-alive connection the server closed at the moment we reused it: sampling is
# stateless, so the request is sent once more on a new connection (a dead server fails again).
# The retry never takes another pooled connection: when this process could not run for a few
# seconds (a starved CPU), the server's keep-alive timer may have closed all of them at once.
_BROKEN = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)


class VLLMClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        max_in_flight: int | None = 256,
    ) -> None:
        """``max_in_flight`` bounds concurrent completions through this client; one more raises
        :class:`SamplerBusy` at once (the API answers 429 and the SDK backs off)."""
        self.base_url = base_url.rstrip("/")
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self._max_model_len: int | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None  # unpooled: one new connection per request

    def _http(self, *, pooled: bool = True) -> aiohttp.ClientSession:
        # created on first use: an aiohttp session belongs to the running event loop
        if not pooled:
            if self._fresh is None or self._fresh.closed:
                self._fresh = self._new_session(aiohttp.TCPConnector(limit=0, force_close=True))
            return self._fresh
        if self._session is None or self._session.closed:
            self._session = self._new_session(
                aiohttp.TCPConnector(
                    limit=self.max_in_flight or 0,  # 0: admission is bounded by the caller
                    limit_per_host=0,
                    # below uvicorn's 5 s keep-alive in vLLM: never reuse a connection it is closing
                    keepalive_timeout=2.0,
                )
            )
        return self._session

    def _new_session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, trust_env=False, skip_auto_headers=("User-Agent",)
        )

    async def __aenter__(self) -> VLLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ----------------------------------------------------------------- transport

    async def _send(
        self, method: str, path: str, data: bytes | None, timeout: aiohttp.ClientTimeout | None, *, pooled: bool = True
    ) -> Reply:
        headers = {"content-type": "application/json"} if data is not None else None
        async with self._http(pooled=pooled).request(
            method, self.base_url + path, data=data, headers=headers, timeout=timeout or self._timeout
        ) as resp:
            return Reply(resp.status, await resp.read(), resp.reason or "")

    @contextlib.contextmanager
    def _transport_errors(self, method: str, path: str) -> Iterator[None]:
        """aiohttp's transport failures as our errors (every HTTP status is an answer)."""
        try:
            yield
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            raise SamplerUnavailable(f"sampler at {self.base_url} is not reachable: {e!r}") from e
        except _BROKEN as e:
            raise SamplerUnavailable(f"connection to sampler at {self.base_url} broke: {e!r}") from e
        except TimeoutError as e:  # aiohttp's timeouts are TimeoutError subclasses
            raise SamplerFailed(f"sampler at {self.base_url} timed out on {method} {path}") from e
        except aiohttp.ClientError as e:
            raise SamplerFailed(f"HTTP error talking to sampler at {self.base_url}: {e!r}") from e

    async def _raw(self, method: str, path: str, *, data: bytes | None = None, timeout: float | None = None) -> Reply:
        """One HTTP exchange; transport failures as our errors, any status returned."""
        t = (
            None
            if timeout is None
            else aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, self._connect_timeout_s))
        )
        with self._transport_errors(method, path):
            try:
                return await self._send(method, path, data, t)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                raise
            except _BROKEN:
                return await self._send(method, path, data, t, pooled=False)

    async def post_unread(self, path: str, data: bytes) -> aiohttp.ClientResponse:
        """POST JSON ``data`` to ``path``; the response once its head has arrived, its body
        unread, to be passed through as it arrives (streamed completions). The caller
        ``release()``s it. Transport failures raise our errors, like every other call."""
        with self._transport_errors("POST", path):
            return await self._http().post(
                self.base_url + path, data=data, headers={"content-type": "application/json"}
            )

    async def _request(
        self, method: str, path: str, *, json_body: Any = None, timeout: float | None = None, model: str | None = None
    ) -> Reply:
        data = None if json_body is None else msgspec.json.encode(json_body)
        resp = await self._raw(method, path, data=data, timeout=timeout)
        if resp.status >= 300:
            raise map_http_error(resp, model=model)
        return resp

    # ----------------------------------------------------------------- probes

    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when ``GET /health`` answers 200 (engine alive); False on anything else."""
        try:
            resp = await self._raw("GET", "/health", timeout=timeout_s)
        except SamplingError:
            return False
        return resp.status == 200

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
            cards.append(
                ModelCard(id=m["id"], parent=m.get("parent"), root=m.get("root"), max_model_len=m.get("max_model_len"))
            )
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
        resp = await self._raw("POST", path, data=json.dumps(body).encode())
        try:
            return resp.status, resp.json()
        except msgspec.DecodeError:
            return resp.status, {"error": {"message": resp.text[:500], "code": resp.status}}

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
            return resp.json()
        except msgspec.DecodeError as e:
            raise SamplerFailed(f"sampler answered non-JSON: {resp.text[:200]!r}") from e

    async def sample(
        self, request: Mapping[str, Any] | SampleSpec, *, model: str, request_id: str | None = None
    ) -> bytes:
        """Run one Tinker ``asample`` body against ``model`` (the served base-model name, or an
        adapter's LoRA name); the serialized ``SampleResponse`` protobuf."""
        return (await self.sample_counted(request, model=model, request_id=request_id))[0]

    async def sample_counted(
        self, request: Mapping[str, Any] | SampleSpec, *, model: str, request_id: str | None = None
    ) -> tuple[bytes, Tokens]:
        """:meth:`sample`, and what it produced: the sequences returned and the tokens vLLM
        reported (a greedy request runs once and its sequence is repeated: counted as returned)."""
        spec = request if isinstance(request, SampleSpec) else parse_sample_request(request)
        mml = await self.max_model_len() if spec.max_tokens is None else None
        body = build_completion_body(spec, model=model, max_model_len=mml, request_id=request_id)
        answer = await self.completions(body)
        got = Tokens.of_completion(answer) or Tokens()
        repeat = spec.num_samples // spec.vllm_n
        tokens = Tokens(samples=spec.num_samples, prompt=got.prompt, completion=got.completion * repeat)
        return completion_to_sample_response(spec, answer), tokens
