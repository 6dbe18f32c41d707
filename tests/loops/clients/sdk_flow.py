"""The Loops SDK flow the issue names, run unmodified in the Loops client venv against openloops
(LOOPS_BASE_URL, BASETEN_API_KEY): create a trainer, pipelined forward_backward + optim_step
(the loss falls), forward, save_state, save_weights_for_sampler, list_checkpoints,
save_weights_and_get_sampling_client + sample + compute_logprobs, then
create_training_client_from_state_with_optimizer gives the same loss; a DPO step with reference
logprobs from the sampler (the SDK's helper). Prints one JSON object."""

import json
import os
import sys

from baseten.loops import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient, TensorData
from baseten.loops.helpers.datum import attach_reference_logprobs
from transformers import AutoTokenizer

MODEL = os.environ["OPENLOOPS_TEST_MODEL"]
tok = AutoTokenizer.from_pretrained(os.environ["OPENLOOPS_TEST_TOKENIZER"])
out: dict = {}


def datum(prompt: str, answer: str) -> Datum:
    p, a = tok.encode(prompt), tok.encode(answer)
    tokens = p + a
    # no label shift inside the trainer: target i is token i+1; the prompt is ignored (-100)
    targets = [-100] * (len(p) - 1) + a + [-100]
    return Datum(
        model_input=ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])},
    )


data = [datum("the quick brown fox", " jumps over the lazy dog"), datum("hello there", " general kenobi")]
service = ServiceClient()
out["session_id"] = service.session_id
tc = service.create_lora_training_client(MODEL, rank=8, seed=0, name="sdk-flow")
out["run_id"] = tc.run_id

losses = []
for _ in range(4):
    fb = tc.forward_backward(data, "cross_entropy")  # pipelined: the step is submitted before the result is read
    opt = tc.optim_step(AdamParams(learning_rate=5e-3))
    losses.append(fb.result().loss)
    out.setdefault("optim_metrics", opt.result().metrics)
out["losses"] = losses
fwd = tc.forward(data, "cross_entropy").result()
out["forward_loss"] = fwd.loss
out["forward_outputs"] = [sorted(o) for o in fwd.loss_fn_outputs]
out["forward_logprobs"] = [o["logprobs"].data for o in fwd.loss_fn_outputs]
out["policy_version"] = tc.policy_version

state = tc.save_state("state-4").result()
out["state_path"] = state.path
staged = tc.save_weights_for_sampler("staged-4").result()
out["staged"] = {"version": staged.version, "path": staged.path}
out["checkpoints"] = sorted(
    (c.checkpoint_id, c.target.value if c.target else None, c.lora_adapter_config.rank) for c in tc.list_checkpoints()
)

sc = tc.save_weights_and_get_sampling_client("default")
prompt = ModelInput.from_ints(tok.encode("the quick brown"))
res = sc.sample(prompt, num_samples=2, sampling_params=SamplingParams(max_tokens=6, temperature=0.7, seed=1))
out["samples"] = [{"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason} for s in res.sequences]
out["sample_policy_version"] = res.policy_version
out["prompt_logprobs"] = sc.compute_logprobs(ModelInput.from_ints(data[0].model_input.to_ints()))
out["sampler_base_model"] = sc.discover_base_model_name()
out["sampler_adapter"] = sc.discover_adapter_name()

# DPO with the SDK's helper: reference logprobs from the sampler serving the current weights,
# so at first the policy equals the reference (loss log 2); one step prefers the chosen answer
pair = [datum("the capital of france is", " paris"), datum("the capital of france is", " london")]
pair = attach_reference_logprobs(pair, sc)
out["dpo_before"] = tc.forward(pair, "dpo", {"beta": 0.1}).result().loss
dpo = tc.forward_backward(pair, "dpo", {"beta": 0.1})
tc.optim_step(AdamParams(learning_rate=2e-2)).result()
out["dpo_metrics"] = dpo.result().metrics
out["dpo_after"] = tc.forward(pair, "dpo", {"beta": 0.1}).result().loss


def custom_loss(batch, logprobs):  # a client-side loss: minus the mean logprob of the answers
    total = sum(lp.sum() for lp in logprobs)
    count = sum(int((lp != 0).sum()) for lp in logprobs)
    return -total / count, {"custom_nll": float(-total / count)}


custom = tc.forward_backward_custom(data, custom_loss).result()
tc.optim_step(AdamParams(learning_rate=5e-3)).result()
out["custom_metrics"] = custom.metrics

resumed = service.create_training_client_from_state_with_optimizer(state.path)
out["resumed_run_id"] = resumed.run_id
out["resumed_forward_loss"] = resumed.forward(data, "cross_entropy").result().loss
fb2 = resumed.forward_backward(data, "cross_entropy")
resumed.optim_step(AdamParams(learning_rate=5e-3)).result()
out["resumed_next_loss"] = fb2.result().loss
tc.close()
resumed.close()
sc.close()
print(json.dumps(out))
sys.stdout.flush()
