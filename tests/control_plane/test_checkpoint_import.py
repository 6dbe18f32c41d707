"""``POST /v1/loops/checkpoints/import`` and ``openloops admin checkpoints import``: a PEFT
adapter becomes an org's sampler_weights checkpoint (its files listed, downloadable, a run's
base_checkpoint); what does not fit is a 400 naming the problem and leaves nothing behind.
Also the Tinker checkpoint routes the CLI uses on it: download URLs, publish, cross-org 404s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from control_plane.db.models import Checkpoint, CheckpointFile, Run
from control_plane.statuses import Status
from tests.control_plane.adapters import ATTN, make_adapter, tar_of, tiny_config
from tests.control_plane.conftest import OTHER_MODEL, TEST_MODEL, Api

IMPORT = "/v1/loops/checkpoints/import"


@pytest.fixture
def base_config(data_dir: Path) -> None:
    """The test model's config.json where its catalog entry points (shapes are checked)."""
    model = data_dir / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(tiny_config()))


async def post_import(api: Api, headers: dict, body: bytes, **params: str):
    return await api.client.post(
        IMPORT,
        params={"base_model": TEST_MODEL, **params},
        content=body,
        headers={**headers, "Content-Type": "application/gzip"},
    )


async def counts(api: Api) -> tuple[int, int, int]:
    async with api.runtime.db.session() as s:
        runs = (await s.execute(select(func.count()).select_from(Run))).scalar_one()
        ckpts = (await s.execute(select(func.count()).select_from(Checkpoint))).scalar_one()
    return runs, ckpts, len(api.runtime.store.list(""))


@pytest.mark.usefixtures("base_config")
async def test_import_then_list_download_and_start_a_run_from_it(api: Api, tmp_path: Path) -> None:
    t = await api.tenant("acme")
    adapter = make_adapter(tmp_path / "a", rank=4)
    body = tar_of(adapter, top="my-adapter", extra={"my-adapter/README.md": b"# hi\n"})
    r = await post_import(api, t.headers, body, name="imported-1")
    assert r.status_code == 200, r.text
    res = r.json()
    out = res["checkpoint"]
    run_id = out["run_id"]
    assert out["checkpoint_path"] == f"bt://loops:{run_id}/sampler_weights/imported-1"
    assert out["tinker_path"] == f"tinker://{run_id}/sampler_weights/imported-1"
    assert out["checkpoint_id"] == "imported-1" and out["target"] == "sampler" and out["base_model"] == TEST_MODEL
    assert (res["lora_rank"], res["lora_alpha"], res["train_attn"], res["train_mlp"]) == (4, 16.0, True, True)
    assert res["ignored_files"] == ["my-adapter/README.md"]

    # a normal sampler_weights checkpoint with its files listed, on an import run that runs nothing
    async with api.runtime.db.session() as s:
        ck = await s.get(Checkpoint, out["id"])
        assert ck is not None and ck.kind == "sampler_weights" and ck.base_model == TEST_MODEL
        assert ck.lora_config == {
            "rank": 4,
            "alpha": 16.0,
            "seed": 0,
            "train_attn": True,
            "train_mlp": True,
            "train_unembed": False,
        }
        files = {
            f.relative_path: f.size_bytes
            for f in (await s.execute(select(CheckpointFile).where(CheckpointFile.checkpoint_id == ck.id))).scalars()
        }
        run = await s.get(Run, run_id)
        assert run is not None and run.status == Status.INACTIVE.value and run.origin == "import" and run.lora_rank == 4
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    assert files["adapter_model.safetensors"] == len(weights) and set(files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert ck.size_bytes == sum(files.values())

    listed = (await api.client.get("/v1/loops/checkpoints", params={"run_id": run_id}, headers=t.headers)).json()
    assert listed["checkpoints"] == [out]
    tinker = (await api.client.get(f"/api/v1/training_runs/{run_id}/checkpoints", headers=t.headers)).json()
    assert [(c["checkpoint_type"], c["tinker_path"], c["public"]) for c in tinker["checkpoints"]] == [
        ("sampler", out["tinker_path"], False)
    ]
    info = (await api.client.get(f"/api/v1/training_runs/{run_id}", headers=t.headers)).json()
    assert info["lora_rank"] == 4 and info["last_sampler_checkpoint"]["tinker_path"] == out["tinker_path"]

    # download URLs (the route tinker checkpoint download reads): the stored bytes
    urls = (
        await api.client.get(
            f"/api/v1/training_runs/{run_id}/checkpoints/sampler_weights/imported-1/external_weights_urls",
            headers=t.headers,
        )
    ).json()
    assert set(urls["urls"]) == set(files) and urls["expires"]
    got = {
        name: (await api.client.get(url.removeprefix("http://testserver"))).content
        for name, url in urls["urls"].items()
    }
    assert got["adapter_model.safetensors"] == weights
    cfg = json.loads(got["adapter_config.json"])
    assert (
        cfg["base_model_name_or_path"] == TEST_MODEL
        and cfg["r"] == 4
        and cfg["target_modules"] == json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    )

    # a Loops run starts from it (its first op loads the adapter); the rank must match
    sid = (await api.client.post("/v1/loops/sessions", headers=t.headers, json={})).json()["session"]["id"]
    r = await api.client.post(
        "/v1/loops/trainers",
        headers=t.headers,
        json={"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 4, "base_checkpoint": out["checkpoint_path"]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["run"]["base_checkpoint"] == out["checkpoint_path"]
    r = await api.client.post(
        "/v1/loops/trainers",
        headers=t.headers,
        json={"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 8, "base_checkpoint": out["checkpoint_path"]},
    )
    assert r.status_code == 400 and "lora_rank=4" in r.json()["detail"]

    # the same name twice: two import runs, two checkpoints
    r2 = await post_import(api, t.headers, tar_of(adapter, gz=False), name="imported-1")
    assert r2.status_code == 200 and r2.json()["checkpoint"]["run_id"] != run_id


@pytest.mark.usefixtures("base_config")
async def test_bad_adapters_are_400s_that_leave_nothing_behind(api: Api, tmp_path: Path) -> None:
    t = await api.tenant("acme")
    good = make_adapter(tmp_path / "good")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    before = await counts(api)
    cases = [
        (tar_of(only_config), {}, "no adapter_model.safetensors"),
        (
            tar_of(make_adapter(tmp_path / "regex", config_updates={"target_modules": "q_proj|v_proj"})),
            {},
            "regular expression",
        ),
        (tar_of(make_adapter(tmp_path / "big", rank=1024)), {}, "must be an integer in [1, 512]"),
        (
            tar_of(make_adapter(tmp_path / "other", cfg={**tiny_config(), "hidden_size": 64})),
            {},
            "an adapter for another model",
        ),
        (tar_of(make_adapter(tmp_path / "half", targets=["q_proj", "v_proj"])), {}, "together"),
        (tar_of(good), {"base_model": "nobody/unknown"}, "unsupported base model 'nobody/unknown'"),
        (tar_of(good), {"name": "../etc"}, "invalid checkpoint name"),
        (b"definitely not a tar archive", {}, "not a tar archive"),
        (tar_of(good)[:200], {}, "not a tar archive"),
        (b"", {}, "body is empty"),
    ]
    for body, params, needle in cases:
        r = await post_import(api, t.headers, body, **params)
        assert r.status_code == 400, (needle, r.text)
        assert needle in r.json()["detail"], (needle, r.json())
    assert await counts(api) == before

    # a failure after the upload (the insert fails) removes the uploaded files again
    async with api.runtime.db.transaction() as s:
        from sqlalchemy import text

        await s.execute(
            text(
                "CREATE OR REPLACE FUNCTION fail_ck() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no'; END $$"
            )
        )
        await s.execute(
            text("CREATE TRIGGER fail_ck BEFORE INSERT ON checkpoint_files FOR EACH ROW EXECUTE FUNCTION fail_ck()")
        )
    try:
        with pytest.raises(Exception, match="no"):
            from control_plane.services.checkpoint_import import import_adapter

            await import_adapter(
                api.runtime.db,
                api.runtime.store,
                api.runtime.catalog,
                t.principal,
                directory=good,
                base_model=TEST_MODEL,
            )
    finally:
        async with api.runtime.db.transaction() as s:
            await s.execute(text("DROP TRIGGER fail_ck ON checkpoint_files"))
    assert await counts(api) == before

    # over the size limit: 413, by the announced length or by what arrives
    api.runtime.settings = api.runtime.settings.model_copy(update={"checkpoint_import_limit_bytes": 2048})
    r = await post_import(api, t.headers, tar_of(good))
    assert r.status_code == 413 and "2048" in r.json()["detail"]
    assert await counts(api) == before


async def test_cross_org_and_publish(api: Api, tmp_path: Path) -> None:
    t = await api.tenant("acme")
    other = await api.tenant("intruder", email="i@example.com")
    out = (await post_import(api, t.headers, tar_of(make_adapter(tmp_path / "a", rank=4)), name="shared")).json()[
        "checkpoint"
    ]
    run_id, cid = out["run_id"], "sampler_weights/shared"
    base = f"/api/v1/training_runs/{run_id}"
    for method, path in (
        ("GET", base),
        ("GET", f"{base}/checkpoints"),
        ("GET", f"{base}/checkpoints/{cid}/external_weights_urls"),
        ("POST", f"{base}/checkpoints/{cid}/publish"),
        ("DELETE", f"{base}/checkpoints/{cid}/publish"),
        ("PUT", f"{base}/checkpoints/{cid}/ttl"),
        ("DELETE", f"{base}/checkpoints/{cid}"),
    ):
        r = await api.client.request(
            method, path, headers=other.headers, json={"ttl_seconds": 3600} if method == "PUT" else None
        )
        assert r.status_code == 404, (method, path, r.text)
    sid = (await api.client.post("/v1/loops/sessions", headers=other.headers, json={})).json()["session"]["id"]
    start = {"session_id": sid, "base_model": TEST_MODEL, "lora_rank": 4, "base_checkpoint": out["checkpoint_path"]}
    r = await api.client.post("/v1/loops/trainers", headers=other.headers, json=start)
    assert r.status_code == 400 and "not found" in r.json()["detail"]

    # published: other orgs may start from it (and still not list, change or delete it)
    r = await api.client.post(f"{base}/checkpoints/{cid}/publish", headers=t.headers)
    assert r.status_code == 200 and r.json()["public"] is True
    assert (await api.client.post(f"{base}/checkpoints/{cid}/publish", headers=t.headers)).json()["public"] is True
    assert (await api.client.get(f"{base}/checkpoints", headers=t.headers)).json()["checkpoints"][0]["public"] is True
    r = await api.client.post("/v1/loops/trainers", headers=other.headers, json=start)
    assert r.status_code == 200, r.text
    assert (await api.client.get(f"{base}/checkpoints", headers=other.headers)).status_code == 404
    assert (await api.client.delete(f"{base}/checkpoints/{cid}", headers=other.headers)).status_code == 404
    r = await api.client.delete(f"{base}/checkpoints/{cid}/publish", headers=t.headers)
    assert r.status_code == 200 and r.json()["public"] is False
    assert (await api.client.post("/v1/loops/trainers", headers=other.headers, json=start)).status_code == 400

    # actions that do not exist, and a malformed id
    assert (await api.client.post(f"{base}/checkpoints/{cid}/nothing", headers=t.headers)).status_code == 404
    assert (await api.client.get(f"{base}/checkpoints/{cid}", headers=t.headers)).status_code == 404
    r = await api.client.get(f"{base}/checkpoints/bogus/shared/external_weights_urls", headers=t.headers)
    assert r.status_code == 400 and "external_weights/<name>" in r.json()["detail"]
    # the owner deletes it: row and files
    r = await api.client.delete(f"{base}/checkpoints/{cid}", headers=t.headers)
    assert r.status_code == 200 and r.json()["files_removed"] == 2
    assert api.runtime.store.list("checkpoints/") == []


def test_admin_cli_imports_a_directory(clean_state: None, services, data_dir: Path, tmp_path: Path) -> None:
    from tests.control_plane.conftest import make_settings

    settings = make_settings(services, data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENLOOPS_")}
    env.update(
        OPENLOOPS_DATABASE_URL=services.database_url,
        OPENLOOPS_REDIS_URL=services.redis_url,
        OPENLOOPS_DATA_DIR=str(data_dir),
        OPENLOOPS_MODEL_CATALOG_PATH=str(settings.model_catalog_path),
    )

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "control_plane.cli.main", "admin", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert admin("orgs", "create", "acme").returncode == 0
    adapter = make_adapter(tmp_path / "a", rank=8, targets=[*ATTN, "lm_head"])
    r = admin(
        "checkpoints",
        "import",
        str(adapter),
        "--org",
        "acme",
        "--base-model",
        TEST_MODEL,
        "--name",
        "from-cli",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["lora_rank"] == 8 and out["checkpoint_path"] == f"bt://loops:{out['run_id']}/sampler_weights/from-cli"
    listed = json.loads(admin("checkpoints", "list", "--org", "acme", "--base-model", TEST_MODEL, "--json").stdout)
    assert [(c["id"], c["kind"], c["name"]) for c in listed] == [(out["id"], "sampler_weights", "from-cli")]
    r = admin("checkpoints", "import", str(adapter), "--org", "acme", "--base-model", OTHER_MODEL)
    assert r.returncode == 0  # OTHER_MODEL has no local config.json: only the adapter's own consistency is checked
    bad = make_adapter(tmp_path / "b", config_updates={"use_dora": True})
    r = admin("checkpoints", "import", str(bad), "--org", "acme", "--base-model", TEST_MODEL)
    assert r.returncode == 1 and "use_dora" in r.stderr
