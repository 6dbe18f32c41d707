"""Hostile input is refused at the edge with a 400 naming the field, and writes nothing: NUL
characters (PostgreSQL text cannot hold them), strings longer than their column, integers
beyond their column's range, JSON nested past any sane depth, a download token whose
signature is not ASCII, and a small zstd body that decompresses past the body cap.

Each of these answered 500 before (the database, the decoder or hmac raised). A real server
(uvicorn on a port, real Postgres and Redis) answers them here."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import zstandard
from sqlalchemy import text

from control_plane.auth.signed_urls import InvalidSignature, UrlSigner
from control_plane.errors import InvalidInput
from control_plane.training.ops import decode_body
from tests.control_plane.conftest import TEST_MODEL, Tenant, make_tenant
from tests.infra.api_server import ApiServer

TABLES = ("sessions", "runs", "samplers", "checkpoints", "deployments", "training_projects")
BODY_LIMIT = 1 << 20


@pytest.fixture
def server(start_api_server: Callable[..., ApiServer]) -> ApiServer:
    return start_api_server(request_body_limit_bytes=BODY_LIMIT, future_poll_timeout_seconds=0.5)


@pytest.fixture
def tenant(server: ApiServer) -> Tenant:
    tenant: Tenant = server.call(make_tenant(server.runtime, "hostile"))
    return tenant


@pytest.fixture
def client(server: ApiServer, tenant: Tenant) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=tenant.headers, timeout=30) as c:
        yield c


def state(server: ApiServer) -> dict[str, int]:
    """Rows of every table a request could write, and the keys in Redis."""

    async def read() -> dict[str, int]:
        rt = server.runtime
        async with rt.db.session() as s:
            out = {t: int((await s.execute(text(f"SELECT count(*) FROM {t}"))).scalar_one()) for t in TABLES}
        out["redis_keys"] = int(await rt.redis.dbsize())
        return out

    counts: dict[str, int] = server.call(read())
    return counts


def refused(r: httpx.Response, field: str) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == "invalid_input" and body["detail"] and body["request_id"], body
    assert body["field"] == field, body


def session_id(client: httpx.Client) -> str:
    return str(client.post("/api/v1/create_session", json={}).json()["session_id"])


NUL = "a\x00b"


def nul_cases(sid: str) -> list[tuple[str, str, dict[str, Any], str]]:
    return [
        ("POST", "/api/v1/create_session", {"json": {"display_name": NUL}}, "display_name"),
        ("POST", "/api/v1/create_session", {"json": {"sdk_version": NUL}}, "sdk_version"),
        ("POST", "/api/v1/create_session", {"json": {"tags": ["ok", NUL]}}, "tags[1]"),
        ("POST", "/api/v1/create_session", {"json": {"user_metadata": {"k": {"deep": [NUL]}}}}, "user_metadata"),
        ("POST", "/api/v1/create_session", {"json": {"user_metadata": {NUL: 1}}}, "user_metadata"),
        ("POST", "/v1/loops/sessions", {"json": {"training_project_id": NUL}}, "training_project_id"),
        ("POST", "/v1/loops/samplers", {"json": {"session_id": NUL}}, "session_id"),
        ("POST", "/v1/loops/runs", {"json": {"session_id": sid, "base_model": TEST_MODEL, "name": NUL}}, "name"),
        ("POST", "/v1/loops/runs", {"json": {"session_id": sid, "base_model": NUL}}, "base_model"),
        (
            "POST",
            "/api/v1/create_model",
            {"json": {"session_id": sid, "model_seq_id": 0, "base_model": TEST_MODEL, "user_metadata": {"k": NUL}}},
            "user_metadata",
        ),
        ("POST", "/api/v1/weights_info", {"json": {"tinker_path": f"tinker://{NUL}/weights/x"}}, "tinker_path"),
        ("POST", "/v1/trainers/search", {"json": {"trainer_id": NUL}}, "trainer_id"),
        ("POST", "/api/v1/retrieve_future", {"json": {"request_id": NUL}}, "request_id"),
        (
            "POST",
            "/api/v1/asample",
            {"json": {"sampling_session_id": NUL, "prompt": {"chunks": [{"tokens": [1]}]}}},
            "sampling_session_id",
        ),
        ("POST", "/api/v1/load_weights", {"json": {"path": f"tinker://{NUL}/weights/x", "model_id": "m"}}, "path"),
        ("PUT", f"/api/v1/sessions/{sid}/project", {"json": {"project_id": NUL}}, "project_id"),
        ("GET", "/v1/loops/runs/a%00b", {}, "run_id"),
        ("GET", "/v1/loops/runs", {"params": {"run_id": NUL}}, "run_id"),
        ("GET", "/v1/loops/checkpoints", {"params": {"checkpoint_path": NUL}}, "checkpoint_path"),
        ("GET", "/api/v1/sessions/a%00b", {}, "session_id"),
        ("GET", "/api/v1/training_runs/a%00b/checkpoints", {}, "run_id"),
        ("POST", "/v1/loops/samplers/a%00b/wake", {}, "sampler_id"),
        ("GET", "/v1/loops/deployments/a%00b", {}, "deployment_id"),
    ]


def test_nul_characters_are_refused_naming_the_field(server: ApiServer, client: httpx.Client) -> None:
    sid = session_id(client)
    before = state(server)
    for method, url, kw, field in nul_cases(sid):
        refused(client.request(method, url, **kw), field)
    assert state(server) == before


def test_strings_longer_than_their_column_are_refused(server: ApiServer, client: httpx.Client) -> None:
    sid = session_id(client)
    before = state(server)
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/api/v1/create_session", {"json": {"display_name": "d" * 201}}, "display_name"),
        ("POST", "/api/v1/create_session", {"json": {"sdk_version": "1" * 41}}, "sdk_version"),
        ("POST", "/api/v1/create_session", {"json": {"project_id": "p" * 41}}, "project_id"),
        ("POST", "/v1/loops/runs", {"json": {"session_id": sid, "base_model": TEST_MODEL, "name": "n" * 201}}, "name"),
        ("POST", "/v1/loops/runs", {"json": {"session_id": "s" * 65, "base_model": TEST_MODEL}}, "session_id"),
        ("POST", "/v1/loops/runs", {"json": {"session_id": sid, "base_model": "m" * 201}}, "base_model"),
        ("POST", "/v1/trainers/search", {"json": {"trainer_id": "t" * 129}}, "trainer_id"),
        ("PUT", f"/api/v1/sessions/{sid}/project", {"json": {"project_id": "p" * 41}}, "project_id"),
        ("GET", f"/v1/loops/runs/{'r' * 129}", {}, "run_id"),
        ("GET", f"/v1/loops/checkpoints/{'c' * 41}/files", {}, "checkpoint_id"),
    ]
    for method, url, kw, field in cases:
        refused(client.request(method, url, **kw), field)
    assert state(server) == before


def test_integers_beyond_their_column_are_refused(server: ApiServer, client: httpx.Client) -> None:
    sid = session_id(client)
    before = state(server)
    model = {"session_id": sid, "model_seq_id": 0, "base_model": TEST_MODEL}
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/api/v1/create_model", {"json": {**model, "model_seq_id": 2**31}}, "model_seq_id"),
        ("POST", "/api/v1/create_model", {"json": {**model, "model_seq_id": -1}}, "model_seq_id"),
        ("POST", "/api/v1/create_model", {"json": {**model, "lora_config": {"seed": 2**64}}}, "lora_config.seed"),
        ("POST", "/v1/loops/runs", {"json": {"session_id": sid, "base_model": TEST_MODEL, "seed": 2**63}}, "seed"),
        (
            "POST",
            "/v1/loops/runs",
            {"json": {"session_id": sid, "base_model": TEST_MODEL, "max_seq_len": 2**31}},
            "max_seq_len",
        ),
        ("POST", "/api/v1/optim_step", {"json": {"model_id": "m", "seq_id": 2**31}}, "seq_id"),
        (
            "POST",
            "/api/v1/create_sampling_session",
            {"json": {"session_id": sid, "sampling_session_seq_id": 2**64, "base_model": TEST_MODEL}},
            "sampling_session_seq_id",
        ),
        ("GET", "/api/v1/sessions", {"params": {"offset": 2**63}}, "offset"),
        ("GET", "/api/v1/checkpoints", {"params": {"offset": 2**63}}, "offset"),
        ("GET", "/api/v1/training_runs", {"params": {"offset": 10**30}}, "offset"),
        ("GET", "/api/v1/sessions", {"params": {"limit": 10**30}}, "limit"),
        ("GET", "/v1/loops/checkpoints/ckpt-1/files", {"params": {"page_token": 10**30}}, "page_token"),
        ("GET", "/v1/loops/checkpoints/ckpt-1/files", {"params": {"page_size": 2**63}}, "page_size"),
        ("GET", "/v1/loops/deployments/dep-1/logs", {"params": {"start_epoch_millis": 10**30}}, "start_epoch_millis"),
        ("POST", "/v1/loops/deployments/dep-1/metrics", {"json": {"end_epoch_millis": 2**63}}, "end_epoch_millis"),
    ]
    for method, url, kw, field in cases:
        refused(client.request(method, url, **kw), field)
    assert state(server) == before


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nested_too_deeply_is_refused(server: ApiServer, client: httpx.Client, tenant: Tenant) -> None:
    sid = session_id(client)
    run = client.post("/v1/loops/trainers", json={"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 8})
    assert run.status_code == 200, run.text
    base_url, run_id = run.json()["run"]["base_url"], run.json()["run"]["id"]
    before = state(server)
    json_headers = {"content-type": "application/json"}
    deep = nested(10_000)
    # past the decoder's recursion limit: in a known field, in an unknown one, on the data plane
    for url, body, headers in [
        ("/api/v1/create_session", '{"user_metadata": {"k": ' + deep + "}}", json_headers),
        ("/api/v1/create_session", '{"whatever": ' + deep + "}", json_headers),
        ("/v1/loops/sessions", deep, json_headers),
        (
            f"{base_url}/optim_step",
            '{"seq_id": 1, "adam_params": {"x": ' + deep + "}}",
            {**json_headers, "X-Run-Id": run_id, "Idempotency-Key": "deep-1"},
        ),
    ]:
        refused(client.post(url, content=body, headers=headers), "body")
    # decodable, but deeper than free-form metadata may nest (its JSONB column and its readers)
    refused(
        client.post(
            "/api/v1/create_session", content='{"user_metadata": {"k": ' + nested(40) + "}}", headers=json_headers
        ),
        "user_metadata",
    )
    assert state(server) == before


def test_a_download_token_with_a_non_ascii_signature_is_refused(server: ApiServer, client: httpx.Client) -> None:
    rt = server.runtime
    rt.store.put_bytes("downloads/probe.bin", b"payload")
    token = rt.download_url("downloads/probe.bin").rsplit("/", 1)[-1]
    good = httpx.get(f"{server.base_url}/v1/downloads/{token}")
    assert good.status_code == 200 and good.content == b"payload"
    payload = token.split(".")[0]
    before = state(server)
    for bad in (f"{payload}.%C3%A9t%C3%A9", f"{payload}.%E2%82%AC", "%F0%9F%94%91.sig"):
        refused(httpx.get(f"{server.base_url}/v1/downloads/{bad}"), "token")
    # a well-formed token with a wrong signature is a 403, not a 400
    assert httpx.get(f"{server.base_url}/v1/downloads/{payload}.AAAA").status_code == 403
    assert state(server) == before
    # the comparison itself cannot raise on any text (it compares bytes)
    signer = UrlSigner(b"secret", "http://x")
    for sig in ("été", "\udcff", "", "€" * 50):
        with pytest.raises(InvalidSignature):
            signer.verify(f"{payload}.{sig}")


def zstd_bomb(size: int, *, declare_size: bool) -> bytes:
    """``size`` zero bytes, zstd-compressed a megabyte at a time (the test never holds them)."""
    chunk = bytes(1 << 20)
    cctx = zstandard.ZstdCompressor(write_content_size=declare_size)
    obj = cctx.compressobj(size=size if declare_size else -1)
    out = [obj.compress(chunk) for _ in range(size // len(chunk))]
    out.append(obj.flush())
    return b"".join(out)


def test_a_zstd_bomb_is_refused_before_and_while_it_decompresses(server: ApiServer, client: httpx.Client) -> None:
    declared = zstd_bomb(256 << 20, declare_size=True)
    undeclared = zstd_bomb(256 << 20, declare_size=False)
    assert len(declared) < BODY_LIMIT and len(undeclared) < BODY_LIMIT  # small on the wire
    assert client.get("/api/v1/healthz").status_code == 200  # the key's cache entries exist before
    before = state(server)
    headers = {"content-encoding": "zstd", "content-type": "application/x-protobuf"}
    for body in (declared, undeclared):
        r = client.post("/api/v1/forward_backward", content=body, headers=headers)
        refused(r, "body")
        assert str(BODY_LIMIT) in r.json()["detail"]
    assert state(server) == before


def test_decompression_stops_at_the_cap() -> None:
    """A frame declaring more than the cap is refused unread; one that does not declare its size
    is decompressed only up to the cap (memory stays near the cap, not the bomb's size)."""
    # a frame whose header declares 4 GiB (single segment, 8-byte size) holding one raw 4-byte block
    lying = b"\x28\xb5\x2f\xfd" + b"\xe0" + (4 << 30).to_bytes(8, "little") + b"\x21\x00\x00" + b"tiny"
    assert zstandard.frame_content_size(lying) == 4 << 30
    with pytest.raises(InvalidInput, match="exceeds"):
        decode_body(lying, "zstd", BODY_LIMIT)
    bomb = zstd_bomb(512 << 20, declare_size=False)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="exceeds") as exc:
            decode_body(bomb, "zstd", BODY_LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.field == "body"
    assert peak < 16 * BODY_LIMIT, peak
    small = zstandard.ZstdCompressor().compress(b"x" * 1000)
    assert decode_body(small, "zstd", BODY_LIMIT) == b"x" * 1000
