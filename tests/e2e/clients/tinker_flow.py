"""Train and sample with whatever `tinker` SDK this interpreter has (an older release in its own
venv: tests/e2e/test_older_sdks.py), against openloops at TINKER_BASE_URL with TINKER_API_KEY.

Capabilities, a LoRA training client on the test model, four pipelined forward_backward +
optim_step, forward, save_state, save_weights_for_sampler, a sampling client on those weights
(greedy and seeded samples, prompt logprobs) and on the base model, save_weights_and_get_sampling_client,
the REST client's checkpoint list, and a training client restored from the saved state. Uses only
calls every SDK from 0.22 on has. Prints one JSON object (the last line of stdout)."""

import json
import math
import os

import tinker
from tinker import types

MODEL = os.environ["OPENLOOPS_TEST_MODEL"]
TEXT = "the cat sat on the mat and the cat sat on the mat again"
out: dict = {"sdk_version": tinker.__version__}


def datum(tok, text: str) -> types.Datum:
    ids = tok.encode(text)
    inp, tgt = ids[:-1], ids[1:]
    return types.Datum(
        model_input=types.ModelInput.from_ints(inp),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tgt, dtype="int64", shape=[len(tgt)]),
            "weights": types.TensorData(data=[1.0] * len(tgt), dtype="float32", shape=[len(tgt)]),
        },
    )


def greedy(sc, prompt: list[int], n: int = 12) -> list[int]:
    r = sc.sample(
        prompt=types.ModelInput.from_ints(prompt),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=n, temperature=0.0, stop=[]),
    ).result()
    return list(r.sequences[0].tokens)


def total_logprob(sc, ids: list[int]) -> float:
    lps = sc.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert lps[0] is None and len(lps) == len(ids), lps
    return float(sum(lps[1:]))


service = tinker.ServiceClient(base_url=os.environ["TINKER_BASE_URL"], api_key=os.environ["TINKER_API_KEY"])
caps = service.get_server_capabilities()
out["models"] = [m.model_name for m in caps.supported_models]

tc = service.create_lora_training_client(MODEL, rank=8, seed=0)
out["model_id"] = tc.model_id
tok = tc.get_tokenizer()  # through get_info's tokenizer_id: a local directory here
ids = tok.encode(TEXT)
data = [datum(tok, TEXT), datum(tok, "a b c d e f g h i j k l m n o p")]

adam = types.AdamParams(learning_rate=2e-2)
losses, logprob_lens = [], []
for _ in range(4):
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(adam)  # pipelined: submitted before the forward_backward result
    res = fb.result()
    losses.append(float(res.metrics["loss:sum"]))
    logprob_lens.append([len(o["logprobs"].tolist()) for o in res.loss_fn_outputs])
    opt.result()
out["losses"] = losses
out["logprob_lens"] = logprob_lens
out["expected_lens"] = [len(d.model_input.to_ints()) for d in data]
fwd = tc.forward([data[0]], "cross_entropy").result()
trainer_lp = [float(x) for x in fwd.loss_fn_outputs[0]["logprobs"].tolist()]
out["forward_loss"] = float(fwd.metrics["loss:sum"])

state = tc.save_state("state-4").result()
sampler_ckpt = tc.save_weights_for_sampler("sampler-4").result()
out["state_path"], out["sampler_path"] = state.path, sampler_ckpt.path

prompt = ids[:4]
base = service.create_sampling_client(base_model=MODEL)
trained = service.create_sampling_client(model_path=sampler_ckpt.path)
out["greedy_base"], out["greedy_trained"] = greedy(base, prompt), greedy(trained, prompt)
out["logprob_base"], out["logprob_trained"] = total_logprob(base, ids), total_logprob(trained, ids)
sampler_lp = trained.compute_logprobs(types.ModelInput.from_ints(ids)).result()[1:]
out["trainer_vs_sampler_max_abs_diff"] = max(abs(a - b) for a, b in zip(sampler_lp, trainer_lp, strict=True))
r = trained.sample(
    prompt=types.ModelInput.from_ints(prompt),
    num_samples=2,
    sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[]),
).result()
out["samples"] = [{"tokens": list(s.tokens), "logprobs": list(s.logprobs or [])} for s in r.sequences]
snapshot = tc.save_weights_and_get_sampling_client()
out["greedy_snapshot"] = greedy(snapshot, prompt)

rest = service.create_rest_client()
out["checkpoints"] = sorted(c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints)

restored = service.create_training_client_from_state(state.path)
out["restored_model_id"] = restored.model_id
out["restored_forward_loss"] = float(restored.forward([data[0]], "cross_entropy").result().metrics["loss:sum"])
out["all_finite"] = all(math.isfinite(x) for x in [*losses, out["forward_loss"], out["restored_forward_loss"]])
print(json.dumps(out))
