"""tinker-cookbook 0.6.1's supervised recipe (``tinker_cookbook.supervised.train.main`` over a few
lines of the bundled example_data/conversations.jsonl) through the Loops Tinker shim
(baseten-loops-tinker 0.17.0), run in the Loops client venv against openloops. The SDK is
configured only by LOOPS_BASE_URL / BASETEN_API_KEY: the recipe's ``base_url`` stays None.

The recipe calls ``tinker.ServiceClient`` the way tinker 0.38 allows, three ways the shim's
``tinker.ServiceClient`` does not (each a TypeError / AttributeError without help):

1. ``tinker.ServiceClient(..., display_name=...)``: the shim's ``__init__`` has no such keyword;
2. ``with tinker.ServiceClient(...) as service_client``: the shim's client is no context manager;
3. ``await service_client.create_lora_training_client(...)``: tinker 0.38 returns a client that
   is also an awaitable future; the shim returns a plain ``TrainingClient``.

``_CookbookServiceClient`` below closes exactly those gaps, as a subclass of the shim's own
``tinker.ServiceClient`` put in its place, so every request still goes through the shim and the
Loops SDK unchanged. It also records the run ids of the trainers it created.

Writes the recipe's logs under ``./sl`` (the test's working directory) and prints one JSON
object: the run ids and the recipe's log directory.
"""

import asyncio
import json
import os
import sys
from pathlib import Path

import tinker
import tinker_cookbook
from tinker_cookbook import tokenizer_utils
from transformers import AutoTokenizer

MODEL = os.environ["OPENLOOPS_TEST_MODEL"]
TOKENIZER = os.environ["OPENLOOPS_TEST_TOKENIZER"]
N_CONVERSATIONS = int(os.environ.get("OPENLOOPS_TEST_CONVERSATIONS", "4"))
BATCH_SIZE = int(os.environ.get("OPENLOOPS_TEST_BATCH_SIZE", "4"))
EPOCHS = int(os.environ.get("OPENLOOPS_TEST_EPOCHS", "3"))
LEARNING_RATE = float(os.environ.get("OPENLOOPS_TEST_LR", "1e-2"))
RENDERER = "role_colon"

_ShimServiceClient = tinker.ServiceClient
_ShimTrainingClient = tinker.TrainingClient
created_run_ids: list[str] = []


class _AwaitableTrainingClient(_ShimTrainingClient):
    """The shim's training client, which ``await`` also yields (as tinker 0.38's does)."""

    def __await__(self):
        async def _self():
            return self

        return _self().__await__()


class _CookbookServiceClient(_ShimServiceClient):
    def __init__(self, *args, display_name=None, **kwargs):  # gap 1: display_name is dropped
        super().__init__(*args, **kwargs)

    def __enter__(self):  # gap 2
        return self

    def __exit__(self, *exc):
        return None

    def create_lora_training_client(self, *args, **kwargs):  # gap 3
        client = super().create_lora_training_client(*args, **kwargs)
        created_run_ids.append(client.run_id)
        client.__class__ = _AwaitableTrainingClient  # adds only a method, like the shim's own _wrap
        return client


tinker.ServiceClient = _CookbookServiceClient  # what the recipe's `tinker.ServiceClient(...)` finds

from tinker_cookbook.supervised import train  # noqa: E402
from tinker_cookbook.supervised.data import FromConversationFileBuilder  # noqa: E402
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig  # noqa: E402

# the tiny model's local tokenizer: no Hub
tokenizer_utils.register_tokenizer(MODEL, lambda: AutoTokenizer.from_pretrained(TOKENIZER))

bundled = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
conversations = Path("conversations.jsonl").resolve()
conversations.write_text("\n".join(bundled.read_text().splitlines()[:N_CONVERSATIONS]) + "\n")
log_path = Path("sl").resolve()

cfg = train.Config(
    log_path=str(log_path),
    model_name=MODEL,
    recipe_name="openloops_loops_shim_sl",
    renderer_name=RENDERER,
    lora_rank=8,
    base_url=None,  # the Loops SDK reads LOOPS_BASE_URL
    learning_rate=LEARNING_RATE,
    num_epochs=EPOCHS,
    save_every=0,
    eval_every=0,
    infrequent_eval_every=0,
    dataset_builder=FromConversationFileBuilder(
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=MODEL, renderer_name=RENDERER, max_length=256, batch_size=BATCH_SIZE
        ),
        file_path=str(conversations),
    ),
)
asyncio.run(train.main(cfg))

print(json.dumps({"run_ids": created_run_ids, "log_path": str(log_path)}))
sys.stdout.flush()
