"""Sampling through vLLM samplers: Tinker asample <-> vLLM /v1/completions, errors, HTTP client.

Typical use in the API server::

    client = VLLMClient(sampler.endpoint)            # one per sampler endpoint, shared
    model = adapter_name_for_prefix(checkpoint.storage_prefix) if checkpoint else base_model
    payload = await client.sample(asample_json_body, model=model)   # SampleResponse bytes

``parse_sample_request`` can run first (synchronously, in the route) to reject bad requests
with a 400 before a future is created.
"""

from control_plane.sampling.client import ModelCard, VLLMClient, map_http_error
from control_plane.sampling.errors import (
    AdapterLoadFailed,
    AdapterNotFound,
    InvalidSampleRequest,
    SamplerBusy,
    SamplerFailed,
    SamplerUnavailable,
    SamplingError,
    UnsupportedSampleFeature,
)
from control_plane.sampling.translate import (
    SampleSpec,
    build_completion_body,
    build_sample_response,
    completion_to_sample_response,
    parse_sample_request,
)
from data_plane.sampler.names import adapter_name_for_prefix

__all__ = [
    "AdapterLoadFailed",
    "AdapterNotFound",
    "InvalidSampleRequest",
    "ModelCard",
    "SampleSpec",
    "SamplerBusy",
    "SamplerFailed",
    "SamplerUnavailable",
    "SamplingError",
    "UnsupportedSampleFeature",
    "VLLMClient",
    "adapter_name_for_prefix",
    "build_completion_body",
    "build_sample_response",
    "completion_to_sample_response",
    "map_http_error",
    "parse_sample_request",
]
