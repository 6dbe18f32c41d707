"""Errors of the sampling path (control plane <-> vLLM sampler), independent of HTTP libraries.

Each carries the HTTP status the API should answer with (when it answers synchronously) and
the Tinker ``RequestErrorCategory`` to use when it fails a future (``user`` | ``server``).
"""

from __future__ import annotations


class SamplingError(Exception):
    status_code: int = 500
    category: str = "server"

    def __init__(self, message: str, *, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.upstream_status = upstream_status


class InvalidSampleRequest(SamplingError):
    """The request cannot be served as sent (bad parameters, prompt too long, bad token ids)."""

    status_code = 400
    category = "user"


class UnsupportedSampleFeature(InvalidSampleRequest):
    """A Tinker sampling feature this server does not implement (image chunks,
    ``prompt_alt_tokens_k``, ``prompt_logprobs_last_n``, ``target_prompt_logprobs``)."""


class AdapterNotFound(SamplingError):
    """vLLM does not know the model/adapter name and its resolver could not find it."""

    status_code = 404
    category = "user"


class AdapterLoadFailed(SamplingError):
    """The adapter exists in the store but vLLM refused to load it (e.g. rank too large)."""

    status_code = 400
    category = "user"


class SamplerBusy(SamplingError):
    """The sampler is saturated; the API maps this to HTTP 429 so the SDK backs off."""

    status_code = 429
    category = "server"


class SamplerUnavailable(SamplingError):
    """The sampler cannot be reached (connection refused, reset, engine dead)."""

    status_code = 503
    category = "server"


class SamplerFailed(SamplingError):
    """vLLM failed the request (5xx) or answered something we cannot interpret."""

    status_code = 500
    category = "server"
