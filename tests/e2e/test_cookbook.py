"""tinker-cookbook 0.6.1 recipes, unmodified, against the live server with the tiny model and
an explicit renderer (role_colon): supervised learning from the bundled conversations file, RL
with ``loss_fn=importance_sampling`` on the synthetic arithmetic task, and DPO from a local
comparisons file. Each must finish cleanly and leave its final checkpoint listed."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import tinker

from tests.sampler.live import LiveStack

pytestmark = pytest.mark.timeout(1200)
RENDERER = "role_colon"


def _checkpoints(stack: LiveStack) -> list[str]:
    rest = tinker.ServiceClient(base_url=stack.base_url, api_key=stack.api_key).create_rest_client()
    runs = rest.list_training_runs().result().training_runs
    out = []
    for run in runs:
        out += [c.tinker_path for c in rest.list_checkpoints(run.training_run_id).result().checkpoints]
    return out


def _chat_recipe(stack: LiveStack, tmp_path: Path, name: str) -> dict[str, Any]:
    """What the supervised and DPO recipes' configs share here: logs under ``tmp_path/name``,
    the live server, a rank-8 LoRA, no intermediate saves or evals."""
    return {
        "log_path": str(tmp_path / name),
        "model_name": stack.base_model,
        "recipe_name": f"test_{name}",
        "renderer_name": RENDERER,
        "lora_rank": 8,
        "base_url": stack.base_url,
        "save_every": 0,
        "eval_every": 0,
        "infrequent_eval_every": 0,
    }


def _chat_data(stack: LiveStack) -> Any:
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    return ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=stack.base_model, renderer_name=RENDERER, max_length=256, batch_size=4
    )


def test_supervised_from_conversation_file(cookbook_env, stack: LiveStack, tmp_path: Path):
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder

    conv = Path(cookbook_env.__file__).parent / "example_data" / "conversations.jsonl"
    lines = conv.read_text().splitlines()[:8]
    small = tmp_path / "conversations.jsonl"
    small.write_text("\n".join(lines) + "\n")
    cfg = train.Config(
        **_chat_recipe(stack, tmp_path, "sl"),
        dataset_builder=FromConversationFileBuilder(common_config=_chat_data(stack), file_path=str(small)),
        learning_rate=1e-3,
    )
    asyncio.run(train.main(cfg))
    metrics = [json.loads(x) for x in (tmp_path / "sl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(metrics) == 2 and all("train_mean_nll" in m for m in metrics)
    final = json.loads((tmp_path / "sl" / "checkpoints.jsonl").read_text().splitlines()[-1])
    assert final["name"] == "final" and final["sampler_path"] in _checkpoints(stack)


def test_rl_importance_sampling_on_arithmetic(cookbook_env, stack: LiveStack, tmp_path: Path):
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
    from tinker_cookbook.rl import train

    cfg = train.Config(
        learning_rate=1e-3,
        dataset_builder=ArithmeticDatasetBuilder(
            batch_size=2,
            model_name_for_tokenizer=stack.base_model,
            renderer_name=RENDERER,
            n_batches=2,
            group_size=4,
            include_fewshot=False,
        ),
        model_name=stack.base_model,
        recipe_name="test_rl",
        max_tokens=8,
        log_path=str(tmp_path / "rl"),
        renderer_name=RENDERER,
        loss_fn="importance_sampling",
        lora_rank=8,
        base_url=stack.base_url,
        eval_every=0,
        save_every=0,
    )
    asyncio.run(train.main(cfg))
    metrics = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [m for m in metrics if "env/all/ac_tokens_per_turn" in m]
    assert len(steps) == 2  # n_batches
    # every rollout sampled tokens (at most max_tokens) and was trained on with importance sampling
    assert all(0 < m["env/all/ac_tokens_per_turn"] <= 8 for m in steps)
    final = json.loads((tmp_path / "rl" / "checkpoints.jsonl").read_text().splitlines()[-1])
    assert final["sampler_path"] in _checkpoints(stack)


def test_dpo_from_local_comparisons(cookbook_env, stack: LiveStack, tmp_path: Path):
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl

    rows = []
    for i in range(8):
        q = f"what is {i} plus {i}?"
        rows.append(
            {
                "comparison": {
                    "prompt_conversation": [{"role": "user", "content": q}],
                    "completion_A": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
                    "completion_B": [{"role": "assistant", "content": "I do not know."}],
                },
                "label": "A",
            }
        )
    path = tmp_path / "comparisons.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = train_dpo.Config(
        **_chat_recipe(stack, tmp_path, "dpo"),
        dataset_builder=DPODatasetBuilderFromComparisons(
            common_config=_chat_data(stack), comparison_builder=ComparisonBuilderFromJsonl(train_path=str(path))
        ),
        learning_rate=1e-4,
    )
    train_dpo.main(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(metrics) == 2 and all("dpo_loss" in m or "loss" in m for m in metrics), metrics[:1]
    assert os.path.exists(tmp_path / "dpo" / "checkpoints.jsonl")
