"""Sampler worker pieces that need no running server: names, launch command, resolver, client errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from control_plane.sampling import (
    AdapterLoadFailed,
    AdapterNotFound,
    InvalidSampleRequest,
    SamplerBusy,
    SamplerFailed,
    SamplerUnavailable,
    VLLMClient,
)
from control_plane.scheduler.ports import free_port
from data_plane.sampler.config import ENV_VAR, SamplerLaunch
from data_plane.sampler.names import (
    InvalidAdapterName,
    adapter_name_for_prefix,
    cache_dir_name,
    validate_adapter_name,
)
from data_plane.wire.worker_config import StoreSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "ckpt/../x",
        "/etc/passwd",
        "ckpt//a",
        "ckpt/a/",
        "ckpt\\a",
        "ckpt/./a",
        ".hidden/a",
        "",
        "a b",
        "ckpt/a\x00",
    ],
)
def test_bad_adapter_names(name):
    with pytest.raises(InvalidAdapterName):
        validate_adapter_name(name)


def test_good_adapter_names_and_prefixes():
    n = "ckpt/org_1/3f2a:train:0/sampler_weights/step-10"
    assert validate_adapter_name(n) == n
    assert validate_adapter_name(n, ["ckpt/"]) == n
    with pytest.raises(InvalidAdapterName, match="outside"):
        validate_adapter_name("other/a", ["ckpt/"])
    assert adapter_name_for_prefix("/ckpt/a/b/") == "ckpt/a/b"
    assert cache_dir_name(n) != cache_dir_name(n + "x") and "/" not in cache_dir_name(n)


def test_launch_roundtrip_and_exec_plan(tmp_path):
    from data_plane.sampler.launch import build_exec

    launch = SamplerLaunch(
        sampler_id="s1",
        model_source="/models/tiny",
        served_model_name="openloops/tiny",
        store=StoreSpec(kind="local", root=str(tmp_path / "store")),
        adapter_cache_dir=str(tmp_path / "cache"),
        port=8123,
        max_model_len=1024,
        max_lora_rank=12,
        max_loras=3,
        adapter_key_prefixes=["ckpt/"],
        device="cpu",
        extra_vllm_args=["--seed", "1"],
    )
    assert SamplerLaunch.from_env(launch.to_env()) == launch
    argv, env = build_exec(launch, environ={"PATH": "/usr/bin"})
    assert argv[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"]
    joined = " ".join(argv)
    for frag in (
        "--model /models/tiny",
        "--served-model-name openloops/tiny",
        "--port 8123",
        "--enable-lora",
        "--max-lora-rank 16",
        "--max-loras 3",
        "--max-model-len 1024",
        "--enforce-eager",
        "--gpu-memory-utilization 0.2",
        "--seed 1",
    ):
        assert frag in joined
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert SamplerLaunch.from_json(env[ENV_VAR]) == launch
    # vLLM's plugin loader (importlib.metadata entry points) sees our resolver in its processes.
    code = (
        "from importlib.metadata import entry_points;"
        "print([e.value for e in entry_points(group='vllm.general_plugins') if e.name=='openloops_store_resolver'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    assert "data_plane.sampler.resolver:register" in out.stdout


def test_resolver_fetches_from_store_and_refuses_escapes(tmp_path):
    pytest.importorskip("vllm")
    from data_plane.sampler.resolver import StoreLoRAResolver
    from data_plane.storage.local import LocalDirStore

    store = LocalDirStore(tmp_path / "store")
    store.put_bytes("ckpt/a/adapter_config.json", json.dumps({"peft_type": "LORA", "r": 8}).encode())
    store.put_bytes("ckpt/a/adapter_model.safetensors", b"weights")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "adapter_config.json").write_text("{}")
    (tmp_path / "secret" / "adapter_model.safetensors").write_text("")
    r = StoreLoRAResolver(store, tmp_path / "cache", allowed_prefixes=["ckpt/"])

    async def go():
        req = await r.resolve_lora("base", "ckpt/a")
        assert req is not None and req.lora_name == "ckpt/a"
        p = Path(req.lora_path)
        assert p.parent == tmp_path / "cache" and (p / "adapter_model.safetensors").read_bytes() == b"weights"
        again = await r.resolve_lora("base", "ckpt/a")  # cached
        assert again.lora_path == req.lora_path
        for bad in ("../secret", "ckpt/../../secret", "/abs", "secret", "ckpt/missing"):
            assert await r.resolve_lora("base", bad) is None, bad

    asyncio.run(go())
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".dl-")]


def test_resolver_store_outage_is_an_error_not_a_missing_adapter(tmp_path):
    pytest.importorskip("vllm")
    from data_plane.sampler.resolver import StoreLoRAResolver
    from data_plane.storage.base import StoreError

    class DownStore:
        def download_file(self, key, path):
            raise StoreError("connection reset")

    def factory():
        return DownStore()

    r = StoreLoRAResolver(factory, tmp_path / "cache")
    with pytest.raises(RuntimeError, match="object store error"):
        asyncio.run(r.resolve_lora("base", "ckpt/a"))


@contextlib.asynccontextmanager
async def _stand_in(handler):
    """A real HTTP server on a free port whose every POST /v1/completions is ``handler``."""
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _err(status, message, typ="BadRequestError"):
    return {
        "status": status,
        "body": json.dumps({"error": {"message": message, "type": typ, "param": None, "code": status}}),
    }


@pytest.mark.parametrize(
    "response, exc",
    [
        (_err(404, "The model `ckpt/x` does not exist.", "NotFoundError"), AdapterNotFound),
        (_err(400, "LoRA adapter 'ckpt/x' was found but could not be loaded."), AdapterLoadFailed),
        (_err(400, "This model's maximum context length is 512 tokens."), InvalidSampleRequest),
        ({"status": 429, "body": "slow down"}, SamplerBusy),
        ({"status": 503, "body": ""}, SamplerBusy),
        (_err(500, "EngineCore encountered an issue.", "InternalServerError"), SamplerUnavailable),
        (_err(500, "boom", "InternalServerError"), SamplerFailed),
    ],
)
def test_http_errors_map_to_our_types(response, exc):
    async def handler(request):
        return web.Response(status=response["status"], text=response["body"], content_type="application/json")

    async def go():
        async with _stand_in(handler) as url, VLLMClient(url) as c:
            with pytest.raises(exc) as ei:
                await c.completions({"model": "ckpt/x", "prompt": [1]})
            assert ei.value.upstream_status == response["status"]
            assert str(ei.value)
            if response["body"].startswith("{"):
                assert json.loads(response["body"])["error"]["message"] in str(ei.value)

    asyncio.run(go())


def test_connection_refused_is_unavailable_and_health_false():
    async def go():
        async with VLLMClient(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2) as c:
            assert await c.health() is False
            with pytest.raises(SamplerUnavailable, match="not reachable"):
                await c.completions({"model": "m", "prompt": [1]})
            with pytest.raises(SamplerUnavailable):
                await c.list_models()

    asyncio.run(go())


def test_dropped_connection_is_retried_once_then_unavailable():
    calls = []
    drop = {"left": 1}  # how many of the next requests the server drops

    async def handler(request):
        calls.append(1)
        if drop["left"] > 0:
            drop["left"] -= 1
            request.transport.close()  # the server goes away mid-request
            await asyncio.sleep(0.1)
        return web.json_response({"choices": [], "n": len(calls)})

    async def go():
        async with _stand_in(handler) as url, VLLMClient(url) as c:
            # first attempt dropped, the retry on a fresh connection answers
            assert (await c.completions({"model": "m", "prompt": [1]}))["n"] == 2
            drop["left"] = 2  # the retry is dropped too: a server that keeps breaking
            with pytest.raises(SamplerUnavailable, match="broke"):
                await c.completions({"model": "m", "prompt": [1]})
            assert len(calls) == 4

    asyncio.run(go())


def test_the_retry_of_a_dropped_request_takes_a_new_connection():
    """A server whose keep-alive timer expired on every idle connection while this process
    could not run (a starved CPU) drops the requests that arrive on them: the retry must use a
    new connection, not the next pooled one, which the server drops just the same."""
    served = set()
    warm_up = {"left": 3}

    async def handler(request):
        if warm_up["left"] > 0:
            warm_up["left"] -= 1
            await asyncio.sleep(0.05)  # concurrent: one pooled connection each
        elif request.transport in served:
            request.transport.close()  # an expired keep-alive connection: dropped
            await asyncio.sleep(0.1)
        served.add(request.transport)
        return web.json_response({"choices": []})

    async def go():
        async with _stand_in(handler) as url, VLLMClient(url) as c:
            await asyncio.gather(*[c.completions({"model": "m", "prompt": [1]}) for _ in range(3)])
            assert len(served) >= 2  # the pool holds more than one idle connection
            before = set(served)
            assert (await c.completions({"model": "m", "prompt": [1]})) == {"choices": []}
            assert served - before  # answered on a connection the pool did not have

    asyncio.run(go())


def test_in_flight_limit_raises_busy():
    gate = asyncio.Event()

    async def handler(request):
        await gate.wait()
        return web.json_response({"choices": []})

    async def go():
        async with _stand_in(handler) as url:
            c = VLLMClient(url, max_in_flight=2)
            tasks = [asyncio.create_task(c.completions({"model": "m", "prompt": [1]})) for _ in range(2)]
            await asyncio.sleep(0.2)
            assert c.in_flight == 2
            with pytest.raises(SamplerBusy):
                await c.completions({"model": "m", "prompt": [1]})
            gate.set()
            await asyncio.gather(*tasks)
            assert c.in_flight == 0
            await c.aclose()

    asyncio.run(go())


def test_cli_overrides_and_dry_run(tmp_path, capsys, monkeypatch):
    from data_plane.sampler.launch import main

    launch = SamplerLaunch(
        sampler_id="s1",
        model_source="/m",
        served_model_name="b",
        adapter_cache_dir=str(tmp_path / "cache"),
        port=1,
        device="cpu",
    )
    monkeypatch.setenv(ENV_VAR, launch.to_env()[ENV_VAR])
    main(["--port", "8000", "--host", "0.0.0.0", "--dry-run", "--seed", "3"])
    out = capsys.readouterr().out
    assert "--port 8000" in out and "--host 0.0.0.0" in out and out.strip().endswith("--seed 3")
