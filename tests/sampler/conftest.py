from tests.infra.vllm_server import vllm_server  # noqa: F401  (session fixture)
