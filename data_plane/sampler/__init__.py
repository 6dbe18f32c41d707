"""The sampler worker: vLLM's OpenAI-compatible server plus an object-store LoRA resolver.

``python -m data_plane.sampler`` (see :mod:`data_plane.sampler.launch`). Importing this package
does not import vllm or torch; :mod:`data_plane.sampler.config` and
:mod:`data_plane.sampler.names` are safe for the control plane to use.
"""
