"""The composition root of a control-plane process: everything built once from Settings."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from control_plane.auth.authenticator import Authenticator, RateLimit
from control_plane.auth.signed_urls import UrlSigner
from control_plane.catalog import ModelCatalog
from control_plane.db.engine import Database
from control_plane.metering.requests import RequestMeter
from control_plane.scheduler.protocol import SchedulerBackend
from control_plane.settings import BackendKind, Settings, StoreKind
from control_plane.training.futures import FutureWaiter
from data_plane.storage.base import ObjectStore
from data_plane.wire.worker_config import StoreSpec

RECONCILE_CHANNEL = "openloops:reconcile"


@dataclass
class Runtime:
    settings: Settings
    db: Database
    redis: aioredis.Redis
    catalog: ModelCatalog
    store: ObjectStore
    store_spec: StoreSpec
    authenticator: Authenticator
    signer: UrlSigner
    futures: FutureWaiter
    meter: RequestMeter
    backend: SchedulerBackend | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def download_url(self, key: str) -> str:
        url = self.store.presigned_get_url(key, self.settings.download_url_ttl_seconds)
        return url or self.signer.sign(key, self.settings.download_url_ttl_seconds)

    def workload_backend(self) -> SchedulerBackend:
        """The scheduler backend, for reads about workloads (logs, descriptions) in a process
        that does not run the controller: built on first use."""
        if self.backend is None:
            backend = self.extras.get("read_backend")
            if backend is None:
                backend = self.extras["read_backend"] = build_backend(self.settings, self.redis)
            return backend
        return self.backend

    async def kick_controller(self) -> None:
        """Ask the active controller to reconcile now instead of at its next tick."""
        await self.redis.publish(RECONCILE_CHANNEL, b"1")

    async def close(self) -> None:
        dispatcher = self.extras.pop("sampling_dispatcher", None)  # sampling/dispatcher.dispatcher_for
        if dispatcher is not None:
            await dispatcher.aclose()  # fails in-flight samples' futures, closes its HTTP pools
        proxy = self.extras.pop("served_model_proxy", None)  # sampling/served_proxy.served_proxy_for
        if proxy is not None:
            await proxy.aclose()
        try:
            await self.meter.flush()  # the last counts of this process
        except Exception:  # noqa: BLE001 - the database may already be gone at shutdown
            pass
        for backend in (self.backend, self.extras.pop("read_backend", None)):
            if backend is not None:
                await backend.close()
        await self.futures.close()
        await self.authenticator.close()
        await self.redis.aclose()
        await self.db.close()


def store_spec(settings: Settings) -> StoreSpec:
    if settings.store_kind == StoreKind.S3:
        if not settings.s3_bucket:
            raise ValueError("OPENLOOPS_S3_BUCKET is required when OPENLOOPS_STORE_KIND=s3")
        return StoreSpec(
            kind="s3",
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            prefix=settings.s3_prefix,
        )
    return StoreSpec(kind="local", root=str(settings.resolved_store_root))


def signing_secret(settings: Settings) -> bytes:
    if settings.signing_secret is not None:
        return settings.signing_secret.get_secret_value().encode()
    # local mode: derive a stable per-data-dir secret
    path = settings.data_dir / "signing.key"
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return hashlib.sha256(path.read_bytes()).digest()


def build_backend(settings: Settings, redis: aioredis.Redis) -> SchedulerBackend:
    if settings.backend == BackendKind.KUBERNETES:
        from control_plane.scheduler.kubernetes import KubernetesBackend

        return KubernetesBackend.from_settings(settings.kubernetes)
    from control_plane.scheduler.local import LocalProcessBackend

    return LocalProcessBackend(settings.data_dir / "workers", python=settings.worker_python)


def build_runtime(settings: Settings, *, with_backend: bool = True) -> Runtime:
    if not settings.database_url or not settings.redis_url:
        raise ValueError("database_url and redis_url must be resolved before building the runtime")
    from data_plane.storage.factory import open_store

    db = Database(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        read_pool_size=settings.db_read_pool_size,
        read_cache_seconds=settings.read_cache_seconds,
    )
    redis = aioredis.Redis.from_url(settings.redis_url)
    spec = store_spec(settings)
    auth = Authenticator(
        db,
        redis,
        RateLimit(settings.rate_limit_enabled, settings.rate_limit_per_second, settings.rate_limit_burst),
        settings.key_cache_ttl_seconds,
        local_ttl_s=settings.key_local_cache_seconds,
        lookups_per_minute=settings.auth_lookups_per_minute if settings.rate_limit_enabled else 0,
    )
    return Runtime(
        settings=settings,
        db=db,
        redis=redis,
        catalog=ModelCatalog.load(settings.resolved_catalog_path),
        store=open_store(spec),
        store_spec=spec,
        authenticator=auth,
        signer=UrlSigner(signing_secret(settings), settings.base_url),
        futures=FutureWaiter(redis),
        meter=RequestMeter(db, settings.metrics_flush_seconds),
        backend=build_backend(settings, redis) if with_backend else None,
    )
