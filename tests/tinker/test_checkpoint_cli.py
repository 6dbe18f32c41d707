"""The official ``tinker`` CLI (0.38) against a live openloops server, for every checkpoint
command and ``run list/info``; ``tinker checkpoint download`` gives a standard PEFT adapter that
plain ``peft`` + ``transformers`` load with the trainer's logprobs; that adapter, imported
through ``POST /v1/loops/checkpoints/import``, starts a Loops run whose forward gives the same
logprobs again. Real trainer worker subprocesses, real Postgres/Redis, local object store."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from control_plane.services import identity
from tests.infra.live_server import LiveServer

pytestmark = pytest.mark.timeout(900)

TEXTS = ["the quick brown fox jumps over the lazy dog", "openloops trains tiny models on small machines"]
TOL = 2e-5  # fp32: the trainer and a plain peft model compute the same graph


def cli(live: LiveServer, *args: str, key: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TINKER_BASE_URL": live.base_url, "TINKER_API_KEY": key or live.api_key}
    r = subprocess.run(
        [sys.executable, "-m", "tinker.cli", "-f", "json", *args], env=env, capture_output=True, text=True, timeout=300
    )
    if check:
        assert r.returncode == 0, f"tinker {' '.join(args)}: {r.stdout}\n{r.stderr}"
    return r


def js(r: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(r.stdout)


def datums(tok) -> tuple[list[types.Datum], list[list[int]]]:
    out, ids_all = [], []
    for text in TEXTS:
        ids = tok.encode(text)
        ids_all.append(ids)
        inp, tgt = ids[:-1], ids[1:]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(inp),
                loss_fn_inputs={
                    "target_tokens": types.TensorData(data=tgt, dtype="int64", shape=[len(tgt)]),
                    "weights": types.TensorData(data=[1.0] * len(tgt), dtype="float32", shape=[len(tgt)]),
                },
            )
        )
    return out, ids_all


def peft_logprobs(model_dir: str, adapter_dir: Path, ids_all: list[list[int]]) -> list[np.ndarray]:
    """Plain transformers + peft, nothing of openloops: the target tokens' logprobs."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    out = []
    with torch.no_grad():
        for ids in ids_all:
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
            lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            out.append(lp.numpy())
    return out


def loops_forward_logprobs(live: LiveServer, run: dict, ids_all: list[list[int]]) -> list[np.ndarray]:
    h = {"Authorization": f"Bearer {live.api_key}", "X-Run-Id": run["id"]}
    data = [
        {
            "model_input": {"chunks": [{"type": "encoded_text", "tokens": ids[:-1]}]},
            "loss_fn_inputs": {"target_tokens": {"data": ids[1:], "dtype": "int64", "shape": [len(ids) - 1]}},
        }
        for ids in ids_all
    ]
    with httpx.Client(timeout=60) as c:
        deadline = time.monotonic() + 300
        while c.get(f"{run['base_url']}/health", headers=h).status_code != 200:
            assert time.monotonic() < deadline, "the Loops trainer never became ready"
            time.sleep(0.5)
        r = c.post(
            f"{run['base_url']}/forward",
            headers={**h, "Idempotency-Key": "fwd-1"},
            json={"run_id": run["id"], "seq_id": 1, "data": data, "loss_fn": "cross_entropy"},
        )
        assert r.status_code == 202, r.text
        while (r := c.get(f"{run['base_url']}/operations/fwd-1", headers=h)).status_code == 408:
            pass
        assert r.status_code == 200 and r.json()["status"] == "done", r.text
        outs = r.json()["result"]["loss_fn_outputs"]
    return [np.asarray(o["logprobs"]["data"], dtype=np.float32) for o in outs]


def test_tinker_cli_checkpoint_commands_download_and_import(live_server: LiveServer, tmp_path: Path) -> None:
    live = live_server
    service = tinker.ServiceClient(base_url=live.base_url, api_key=live.api_key)
    tc = service.create_lora_training_client(live.model.name, rank=8, seed=3).result()
    run_id = tc.model_id
    data, ids_all = datums(tc.get_tokenizer())
    for _ in range(3):  # move B off zero: the adapter changes the logprobs
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    state = tc.save_state("final").result().path
    sampler = tc.save_weights_for_sampler("s1").result().path
    trainer_lp = [o["logprobs"].to_numpy() for o in tc.forward(data, "cross_entropy").result().loss_fn_outputs]

    # run list / run info
    runs = js(cli(live, "run", "list"))
    assert run_id in [r["training_run_id"] for r in runs["runs"]]
    info = js(cli(live, "run", "info", run_id))
    assert info["training_run_id"] == run_id and info["lora_rank"] == 8 and info["base_model"] == live.model.name

    # checkpoint list / info
    listed = js(cli(live, "checkpoint", "list", "--run-id", run_id))["checkpoints"]
    assert {(c["tinker_path"], c["checkpoint_type"]) for c in listed} == {(state, "training"), (sampler, "sampler")}
    assert state in [c["tinker_path"] for c in js(cli(live, "checkpoint", "list"))["checkpoints"]]
    ci = js(cli(live, "checkpoint", "info", state))
    assert ci["tinker_path"] == state and ci["public"] is False and ci["lora_rank"] == 8

    # publish / unpublish / set-ttl, as list shows them
    def row(path: str) -> dict:
        rows = js(cli(live, "checkpoint", "list", "--run-id", run_id))["checkpoints"]
        return next(c for c in rows if c["tinker_path"] == path)

    cli(live, "checkpoint", "publish", state)
    assert row(state)["public"] is True
    cli(live, "checkpoint", "unpublish", state)
    assert row(state)["public"] is False
    cli(live, "checkpoint", "set-ttl", state, "--ttl", "7200")
    assert row(state)["expires_at"] is not None
    cli(live, "checkpoint", "set-ttl", state, "--remove")
    assert row(state)["expires_at"] is None

    # download: the CLI loads the state into a new run, exports it (save_weights_external),
    # fetches every file through external_weights_urls, then deletes the export
    t0 = time.monotonic()
    out = js(cli(live, "checkpoint", "download", state, "--output", str(tmp_path)))
    download_s = time.monotonic() - t0
    dest = Path(out["destination"])
    assert dest == tmp_path / state.replace("tinker://", "").replace("/", "_")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in dest.iterdir()}
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == live.model.name
    print(f"\ntinker checkpoint download took {download_s:.1f} s ({out.get('file_size_bytes')} bytes)")
    exports = [c for c in js(cli(live, "checkpoint", "list"))["checkpoints"] if c["checkpoint_type"] == "external"]
    assert exports == []  # the temporary export is gone
    # a sampler checkpoint cannot be downloaded by the CLI (its own rule), with a clear message
    r = cli(live, "checkpoint", "download", sampler, "--output", str(tmp_path / "x"), check=False)
    assert r.returncode != 0 and "Sampler checkpoints cannot be downloaded" in r.stderr

    # plain peft + transformers: the trainer's logprobs
    peft_lp = peft_logprobs(live.model.source, dest, ids_all)
    deltas = [float(np.max(np.abs(a - b))) for a, b in zip(trainer_lp, peft_lp, strict=True)]
    print(f"max |logprob(trainer) - logprob(peft)| = {max(deltas):.2e}")
    assert max(deltas) < TOL, deltas
    base_only = peft_logprobs_base(live.model.source, ids_all)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(trainer_lp, base_only, strict=True)) > 100 * TOL

    # another org's key: not found
    other_key = live.call(_other_tenant(live))
    r = cli(live, "checkpoint", "info", state, key=other_key, check=False)
    assert r.returncode != 0 and "not found" in r.stderr.lower()
    r = cli(live, "run", "info", run_id, key=other_key, check=False)
    assert r.returncode != 0 and "not found" in r.stderr.lower()
    r = httpx.get(
        f"{live.base_url}/api/v1/training_runs/{run_id}/checkpoints/weights/final/external_weights_urls",
        headers={"X-API-Key": other_key},
    )
    assert r.status_code == 404

    # import the downloaded adapter; a Loops run starts from it and computes the same logprobs
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in dest.iterdir():
            tf.add(f, arcname=f.name)
    h = {"Authorization": f"Bearer {live.api_key}"}
    r = httpx.post(
        f"{live.base_url}/v1/loops/checkpoints/import",
        params={"base_model": live.model.name, "name": "from-download"},
        content=buf.getvalue(),
        headers={**h, "Content-Type": "application/gzip"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    imported = r.json()["checkpoint"]
    assert sorted(r.json()["ignored_files"]) == ["openloops_checkpoint.json"]
    sid = httpx.post(f"{live.base_url}/v1/loops/sessions", headers=h, json={}).json()["session"]["id"]
    r = httpx.post(
        f"{live.base_url}/v1/loops/trainers",
        headers=h,
        json={
            "session_id": sid,
            "base_model": live.model.name,
            "lora_rank": 8,
            "base_checkpoint": imported["checkpoint_path"],
        },
    )
    assert r.status_code == 200, r.text
    run = r.json()["run"]
    loops_lp = loops_forward_logprobs(live, run, ids_all)
    deltas = [float(np.max(np.abs(a - b))) for a, b in zip(trainer_lp, loops_lp, strict=True)]
    print(f"max |logprob(trainer) - logprob(run from the imported adapter)| = {max(deltas):.2e}")
    assert max(deltas) < TOL, deltas
    httpx.post(f"{live.base_url}/v1/loops/runs/{run['id']}/deactivate", headers=h)

    # delete (sampler checkpoint), as the CLI does it
    cli(live, "checkpoint", "delete", sampler, "--yes")
    assert [c["tinker_path"] for c in js(cli(live, "checkpoint", "list", "--run-id", run_id))["checkpoints"]] == [state]
    service.close("success").result()


def peft_logprobs_base(model_dir: str, ids_all: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [
            torch.log_softmax(base(input_ids=torch.tensor([ids[:-1]])).logits[0].float(), -1)
            .gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            .numpy()
            for ids in ids_all
        ]


async def _other_tenant(live: LiveServer) -> str:
    async with live.runtime.db.transaction() as s:
        org = await identity.create_org(s, f"other-{time.monotonic_ns()}")
        user = await identity.create_user(s, org, "other@example.com")
        key = await identity.create_api_key(s, user)
    return key.plaintext
