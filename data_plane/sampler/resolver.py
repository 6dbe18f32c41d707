"""vLLM ``LoRAResolver`` plugin: LoRA name -> object-store prefix -> local cache -> LoRARequest.

vLLM calls the resolver (in its API-server process) the first time a request names a model
that is neither the base model nor an already-loaded adapter, provided
``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is on. The name is validated (see
:mod:`data_plane.sampler.names`), its two PEFT files are downloaded from the store into
``<adapter_cache_dir>/<sha256(name)[:40]>/`` (atomically: a temporary directory renamed into
place) and a ``LoRARequest`` pointing at that directory is returned. vLLM then loads it into the
engine and remembers the name; later requests with the same name never reach the resolver.

Registration goes through vLLM's general-plugin mechanism (entry-point group
``vllm.general_plugins``, name :data:`PLUGIN_NAME`, value ``data_plane.sampler.resolver:register``);
vLLM calls :func:`register` in each of its processes. It registers only where the sampler launch
document (``OPENLOOPS_SAMPLER_CONFIG``) is present, so installing openloops next to an unrelated
vLLM server changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from data_plane.sampler.config import ENV_VAR, SamplerLaunch
from data_plane.sampler.names import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILES,
    InvalidAdapterName,
    cache_dir_name,
    validate_adapter_name,
)
from data_plane.storage.base import ObjectNotFound, ObjectStore, StoreError

logger = logging.getLogger("openloops.sampler.resolver")

PLUGIN_NAME = "openloops_store_resolver"
RESOLVER_NAME = "openloops-object-store"
ENTRY_POINT = "data_plane.sampler.resolver:register"


class StoreLoRAResolver(LoRAResolver):
    def __init__(
        self,
        store: ObjectStore | Callable[[], ObjectStore],
        cache_dir: str | Path,
        allowed_prefixes: list[str] | tuple[str, ...] = (),
        max_lora_rank: int | None = None,
    ) -> None:
        self._store = store if isinstance(store, ObjectStore) else None
        self._store_factory = None if isinstance(store, ObjectStore) else store
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.allowed_prefixes = tuple(allowed_prefixes)
        self.max_lora_rank = max_lora_rank

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            assert self._store_factory is not None
            self._store = self._store_factory()
        return self._store

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            validate_adapter_name(lora_name, self.allowed_prefixes)
        except InvalidAdapterName as e:
            logger.warning("refusing LoRA name %r: %s", lora_name, e)
            return None
        try:
            path = await asyncio.to_thread(self.fetch, lora_name)
        except ObjectNotFound as e:
            logger.info("LoRA %r not in the object store (%s)", lora_name, e)
            return None
        except StoreError as e:
            # Not "no such adapter" (404): a store outage must read as a server error (vLLM
            # answers 500), so the caller retries instead of reporting a missing checkpoint.
            logger.warning("LoRA %r: object store error: %s", lora_name, e)
            raise RuntimeError(f"object store error while fetching LoRA adapter {lora_name!r}: {e}") from e
        if path is None:
            return None
        # vLLM replaces lora_int_id with its own counter value before loading.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    def fetch(self, name: str) -> Path | None:
        """Download the adapter into the cache (if not there yet); its directory, or None."""
        final = self.cache_dir / cache_dir_name(name)
        if all((final / f).is_file() for f in ADAPTER_FILES):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=self.cache_dir))
        try:
            for f in ADAPTER_FILES:
                self.store.download_file(f"{name}/{f}", tmp / f)
            cfg = json.loads((tmp / ADAPTER_CONFIG_FILE).read_text())
            if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
                logger.warning("LoRA %r: peft_type %r is not LORA", name, cfg.get("peft_type"))
                return None
            r = int(cfg.get("r") or 0)
            if self.max_lora_rank is not None and r > self.max_lora_rank:
                # vLLM would refuse it too; say why in our log.
                logger.warning("LoRA %r has rank %d > this sampler's max_lora_rank %d", name, r, self.max_lora_rank)
            (tmp / ".openloops-adapter-name").write_text(name)
            try:
                os.rename(tmp, final)
            except OSError:
                # Someone else (another process sharing the cache) finished first.
                if not all((final / f).is_file() for f in ADAPTER_FILES):
                    raise
            return final
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def build_resolver(launch: SamplerLaunch) -> StoreLoRAResolver:
    def open_launch_store() -> ObjectStore:
        from data_plane.storage.factory import open_store

        return open_store(launch.store)

    # The store is opened on first use: vLLM also calls register() in its engine processes.
    return StoreLoRAResolver(
        store=open_launch_store,
        cache_dir=launch.adapter_cache_dir,
        allowed_prefixes=launch.adapter_key_prefixes,
        max_lora_rank=launch.max_lora_rank,
    )


def _die_with_parent() -> None:
    """In vLLM's child processes (engine core, workers): exit when the parent dies.

    Stopping the sampler with SIGTERM lets vLLM shut its engine down, but a SIGKILL of the API
    server alone (OOM killer, a scheduler that kills one pid) would otherwise leave the engine
    and its workers running, holding (GPU) memory. Linux only; no-op in the API server."""
    import multiprocessing
    import signal
    import sys

    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort on platforms without prctl  # pragma: no cover
        logger.warning("could not set PR_SET_PDEATHSIG for %s", os.getpid())
        return
    if os.getppid() != parent.pid:  # the parent already died before prctl
        os._exit(1)


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; a no-op outside a sampler)."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    _die_with_parent()
    from data_plane.sampler import vllm_patches

    vllm_patches.apply()
    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return
    launch = SamplerLaunch.from_json(raw)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, build_resolver(launch))
