"""A plain Loops SDK training loop for the durability test (tests/loops/test_durable_loops_sdk.py),
run unmodified in the Loops client venv against openloops (LOOPS_BASE_URL, BASETEN_API_KEY): a
trainer-only run (no sampler) with a fixed seed (and OPENLOOPS_TEST_REPLICAS data-parallel
replicas, default 1), then OPENLOOPS_TEST_STEPS steps of
forward_backward + optim_step on fixed data, each step's two ops submitted before either result
is read. The run id goes to the file OPENLOOPS_TEST_RUN_ID_FILE as soon as the run exists (the
test watches the run through it). Prints one JSON object: the run id and every step's loss."""

import json
import os
import sys
from pathlib import Path

from baseten.loops import AdamParams, Datum, ModelInput, ServiceClient, TensorData
from transformers import AutoTokenizer

MODEL = os.environ["OPENLOOPS_TEST_MODEL"]
STEPS = int(os.environ.get("OPENLOOPS_TEST_STEPS", "6"))
SEED = 7
LR = 2e-2
TEXTS = [
    "the cat sat on the mat and the cat sat on the mat again",
    "openloops keeps a log of every op until a snapshot covers it",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "one two three four five six seven eight nine ten",
]
tok = AutoTokenizer.from_pretrained(os.environ["OPENLOOPS_TEST_TOKENIZER"])


def datum(text: str) -> Datum:
    tokens = tok.encode(text)
    # no label shift inside the trainer: target i is token i+1; the last position is ignored
    targets = [*tokens[1:], -100]
    return Datum(
        model_input=ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])},
    )


def batch(step: int) -> list[Datum]:
    return [datum(TEXTS[(step + i) % len(TEXTS)] * 3) for i in range(4)]


service = ServiceClient()
REPLICAS = int(os.environ.get("OPENLOOPS_TEST_REPLICAS", "1"))
tc = service.create_lora_training_client(MODEL, rank=4, seed=SEED, name="durable-steps", replicas=REPLICAS)
run_id_file = Path(os.environ["OPENLOOPS_TEST_RUN_ID_FILE"])
partial = run_id_file.with_name(run_id_file.name + ".partial")
partial.write_text(tc.run_id)
partial.replace(run_id_file)  # the test never reads half an id

losses = []
for step in range(STEPS):
    fb = tc.forward_backward(batch(step), "cross_entropy")
    opt = tc.optim_step(AdamParams(learning_rate=LR))
    losses.append(fb.result().loss)
    opt.result()
out = {"run_id": tc.run_id, "losses": losses, "policy_version": tc.policy_version}
tc.close()
print(json.dumps(out))
sys.stdout.flush()
