"""KubernetesBackend: workloads as Deployments (+ a Service for HTTP workloads) in one namespace;
a multi-node workload (``WorkloadSpec.nodes > 1``) as a LeaderWorkerSet
(``leaderworkerset.x-k8s.io/v1``, a custom resource: the LWS controller must be installed)
whose groups of ``nodes`` pods start, run and restart together. Both kinds share a name; every
call below handles either.

* ``ensure``  creates the Deployment or LeaderWorkerSet, then the Service owned by it (409 =
  already there). A workload whose spec changed kind (nodes 1 -> 2 or back) first has its old
  object deleted; the new one is created by a later ``ensure`` once the old one and its pods
  are gone (never two trainers of one run at once).
* ``remove``  deletes the Deployment and the LeaderWorkerSet (propagationPolicy Background: their
  ReplicaSets/StatefulSets and pods go too) and the Service (404 = already gone). The Service's
  ownerReference is the safety net.
* ``scale``   merge-patches ``spec.replicas`` (pods of a Deployment, groups of a LeaderWorkerSet;
  0 = scaled to zero, the definition stays).
* ``observe`` reads an in-memory cache of the namespace's Deployments, LeaderWorkerSets and Pods
  that three list+watch loops keep current (``k8s_watch_cache``; a cluster without the LWS CRD
  has no LeaderWorkerSets) and maps it with ``k8s_status`` / ``k8s_group_status``.
* ``list_workloads`` returns the Deployments and LeaderWorkerSets labelled
  ``app.kubernetes.io/managed-by=openloops`` (from the watch caches; a direct labelled LIST
  until they are synced).
* ``describe`` reads directly (no watch): the Deployment or LeaderWorkerSet, its pods and the
  namespace's events about them (for ``openloops admin ... show``).
* ``logs`` lists the workload's pods and reads each one's log (``pods/log``, the container named
  after the role, ``timestamps=true``, ``sinceSeconds`` from the query's start; plus the previous
  container's log after a restart), then parses and merges them (``workload_logs``). ``desc``
  reads a growing ``tailLines``, ``asc`` a growing ``limitBytes``, until ``limit`` lines are in.
  A pod whose log cannot be read (container not started: 400; gone: 404; kubelet unreachable:
  5xx) is skipped.
* ``usage`` gets each running pod's ``metrics.k8s.io/v1beta1`` PodMetrics (metrics-server);
  without them (404, 503: no metrics-server, or the pod is not scraped yet) CPU and memory are
  None (``k8s_usage``).

The official client is synchronous: every API call runs in this backend's own thread pool, the
watches in their own threads; nothing blocks the event loop. Transient API failures (connection
errors, 429, 5xx) are retried with exponential backoff and jitter; after
``api_retry_attempts`` a ``KubernetesUnavailableError`` is raised. No ``kubernetes`` exception
escapes this module: see ``k8s_errors``.

This is the only module of the control plane that imports ``kubernetes``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import structlog
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from control_plane.scheduler.k8s_errors import (
    KubernetesApiError,
    KubernetesBackendError,
    KubernetesConfigError,
    KubernetesPermissionError,
    KubernetesUnavailableError,
    WorkloadNotFoundError,
)
from control_plane.scheduler.k8s_group_status import group_replicas, group_size, leader_port, observe_group, pod_role
from control_plane.scheduler.k8s_manifests import (
    ANN_SPEC_HASH,
    ANN_WORKLOAD_ID,
    LABEL_LWS_NAME,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    LABEL_WORKLOAD,
    LWS_API_VERSION,
    LWS_GROUP,
    LWS_PLURAL,
    LWS_VERSION,
    MANAGED_BY,
    scale_patch,
    service_manifest,
    workload_name,
    workload_object_manifest,
)
from control_plane.scheduler.k8s_status import observe_workload, parse_time
from control_plane.scheduler.k8s_usage import usage_sample
from control_plane.scheduler.k8s_watch_cache import MANAGED_SELECTOR, WatchCache
from control_plane.scheduler.kubernetes_settings import KubernetesSettings
from control_plane.scheduler.protocol import (
    LogLine,
    LogQuery,
    Observation,
    UsageSample,
    WorkloadDescription,
    WorkloadEvent,
    WorkloadRole,
    WorkloadSpec,
)
from control_plane.scheduler.workload_logs import (
    ORDER_SLACK_NS,
    in_query,
    parse_kubelet_log,
    select,
)

log = structlog.get_logger("openloops.scheduler.kubernetes")

_RETRYABLE_STATUS = frozenset({0, 408, 429, 500, 502, 503, 504})
_MERGE_PATCH = "application/merge-patch+json"
# a pod's log or metrics that cannot be had right now: skipped, not retried (the pod list before
# them proves the API server is reachable; 5xx here is the kubelet or metrics-server)
_SKIP_POD_STATUS = (400, 404, 500, 502, 503, 504)
_LOG_TAIL_LINES = 256  # desc: the first tailLines (grows x4 while short of ``limit`` lines)
_LOG_MAX_TAIL_LINES = 100_000
_LOG_BYTES = 256 * 1024  # asc: the first limitBytes (grows x4)
_LOG_MAX_BYTES = 32 * 1024 * 1024


def build_configuration(settings: KubernetesSettings) -> k8s_client.Configuration:
    """API client configuration: ``api_url`` (tests, a proxy), else in-cluster service
    account, else ``kubeconfig`` (or ``~/.kube/config``)."""
    cfg = k8s_client.Configuration()
    try:
        if settings.api_url:
            cfg.host = settings.api_url.rstrip("/")
        elif settings.in_cluster:
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            k8s_config.load_kube_config(config_file=settings.kubeconfig, client_configuration=cfg)
    except (ConfigException, OSError, ValueError) as exc:
        where = (
            "in-cluster service account"
            if settings.in_cluster
            else f"kubeconfig {settings.kubeconfig or '~/.kube/config'}"
        )
        raise KubernetesConfigError(f"cannot configure the Kubernetes client from the {where}: {exc}") from exc
    return cfg


def _raw_list(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A LIST/WATCH call for a :class:`WatchCache`: the raw HTTP response, and our own
    :class:`KubernetesApiError` (with the HTTP status) instead of the client's exception."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            message = f"{exc.status} {exc.reason}: {_error_message(exc)}"
            raise KubernetesApiError(message, status=exc.status, reason=exc.reason) from None

    return call


@dataclass(frozen=True, slots=True)
class _Kind:
    """The calls for one kind of workload object (Deployment or LeaderWorkerSet) in a namespace;
    each takes the client's keyword arguments (``_preload_content``, ``propagation_policy``, ...)."""

    what: str  # "deployment" | "leaderworkerset", for messages
    create: Callable[..., Any]  # (body)
    read: Callable[..., Any]  # (name)
    patch: Callable[..., Any]  # (name, body)
    delete: Callable[..., Any]  # (name)
    list: Callable[..., Any]  # ()


def _deployment_kind(apps: k8s_client.AppsV1Api, ns: str) -> _Kind:
    return _Kind(
        "deployment",
        create=lambda body, **kw: apps.create_namespaced_deployment(ns, body, **kw),
        read=lambda name, **kw: apps.read_namespaced_deployment(name, ns, **kw),
        patch=lambda name, body, **kw: apps.patch_namespaced_deployment(name, ns, body, **kw),
        delete=lambda name, **kw: apps.delete_namespaced_deployment(name, ns, **kw),
        list=lambda **kw: apps.list_namespaced_deployment(ns, **kw),
    )


def _group_kind(custom: k8s_client.CustomObjectsApi, ns: str) -> _Kind:
    at = (LWS_GROUP, LWS_VERSION, ns, LWS_PLURAL)
    return _Kind(
        "leaderworkerset",
        create=lambda body, **kw: custom.create_namespaced_custom_object(*at, body, **kw),
        read=lambda name, **kw: custom.get_namespaced_custom_object(*at, name, **kw),
        patch=lambda name, body, **kw: custom.patch_namespaced_custom_object(*at, name, body, **kw),
        delete=lambda name, **kw: custom.delete_namespaced_custom_object(*at, name, **kw),
        list=lambda **kw: custom.list_namespaced_custom_object(*at, **kw),
    )


def _group_lister(custom: k8s_client.CustomObjectsApi) -> Callable[..., Any]:
    """LIST/WATCH of LeaderWorkerSets with the signature a :class:`WatchCache` calls."""

    def call(namespace: str, **kwargs: Any) -> Any:
        return custom.list_namespaced_custom_object(LWS_GROUP, LWS_VERSION, namespace, LWS_PLURAL, **kwargs)

    return call


def _error_message(exc: ApiException) -> str:
    body = exc.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            return str(json.loads(body).get("message") or body)
        except (ValueError, AttributeError):
            return body[:500]
    return str(exc.reason or "")


class KubernetesBackend:
    """``SchedulerBackend`` on Kubernetes. Build it with ``KubernetesBackend.from_settings``."""

    name = "kubernetes"
    isolated_workloads = True  # every pod has its own address

    def __init__(
        self,
        settings: KubernetesSettings,
        configuration: k8s_client.Configuration | None = None,
        *,
        max_workers: int = 8,
    ) -> None:
        self.settings = settings
        self.namespace = settings.namespace
        self._cfg = configuration if configuration is not None else build_configuration(settings)
        self._api = k8s_client.ApiClient(self._cfg)
        self._apps = k8s_client.AppsV1Api(self._api)
        self._core = k8s_client.CoreV1Api(self._api)
        self._custom = k8s_client.CustomObjectsApi(self._api)
        self._deployment = _deployment_kind(self._apps, self.namespace)
        self._group = _group_kind(self._custom, self.namespace)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="openloops-k8s-api")
        # the watches get their own connections
        self._watch_api = k8s_client.ApiClient(self._cfg)
        self.deployments = WatchCache(
            "deployments",
            _raw_list(k8s_client.AppsV1Api(self._watch_api).list_namespaced_deployment),
            self.namespace,
            settings,
        )
        # optional: a cluster without the LWS CRD answers 404 (no multi-node workloads there)
        self.groups = WatchCache(
            "leaderworkersets",
            _raw_list(_group_lister(k8s_client.CustomObjectsApi(self._watch_api))),
            self.namespace,
            settings,
            optional=True,
        )
        self.pods = WatchCache(
            "pods",
            _raw_list(k8s_client.CoreV1Api(self._watch_api).list_namespaced_pod),
            self.namespace,
            settings,
            self._on_pod_event,
        )
        self._seen_ready: set[str] = set()  # pod uids/names that have been Ready at least once
        self._started = False
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Any) -> KubernetesBackend:
        """From ``Settings`` (uses ``settings.kubernetes``) or a ``KubernetesSettings``."""
        ks = getattr(settings, "kubernetes", settings)
        if not isinstance(ks, KubernetesSettings):
            raise KubernetesConfigError(f"expected Settings or KubernetesSettings, got {type(settings).__name__}")
        return cls(ks)

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the watches (also done lazily by the first call)."""
        if self._closed:
            raise KubernetesBackendError("backend is closed")
        if not self._started:
            self._started = True
            self.deployments.start()
            self.groups.start()
            self.pods.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.deployments.stop)
        await loop.run_in_executor(None, self.groups.stop)
        await loop.run_in_executor(None, self.pods.stop)
        self._executor.shutdown(wait=False, cancel_futures=True)
        for api in (self._api, self._watch_api):
            try:
                api.close()
            except Exception:  # noqa: BLE001
                pass

    async def wait_synced(self, timeout: float = 10.0) -> bool:
        """True once every cache has completed a first LIST (False on timeout)."""
        await self.start()
        deadline = time.monotonic() + timeout
        informers = (self.deployments, self.groups, self.pods)
        while not all(i.synced.is_set() for i in informers):
            if time.monotonic() >= deadline:
                return False
            if any(i.last_error and not i.synced.is_set() for i in informers):
                return False  # failing to list: let the caller read directly and raise
            await asyncio.sleep(0.02)
        return True

    # --- API calls -------------------------------------------------------------------------
    async def _call(
        self, what: str, fn: Callable[..., Any], *args: Any, ok_status: tuple[int, ...] = (), **kwargs: Any
    ) -> dict[str, Any] | int:
        """Run ``fn`` in the pool, retrying transient failures. Returns the response body as a
        dict, or the status code when it is one of ``ok_status`` (e.g. 404, 409)."""
        got = await self._call_raw(what, fn, *args, ok_status=ok_status, **kwargs)
        if isinstance(got, int):
            return got
        try:
            return json.loads(got) if got else {}
        except ValueError as exc:
            raise KubernetesApiError(f"{what}: the API server's answer is not JSON: {exc}") from None

    async def _call_raw(
        self, what: str, fn: Callable[..., Any], *args: Any, ok_status: tuple[int, ...] = (), **kwargs: Any
    ) -> bytes | int:
        """``_call`` returning the raw body (e.g. a pod's log)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        call = partial(fn, *args, _preload_content=False, _request_timeout=s.api_timeout_seconds, **kwargs)
        last = ""
        for attempt in range(1, s.api_retry_attempts + 1):
            try:
                resp = await loop.run_in_executor(self._executor, call)
                return bytes(resp.data or b"")
            except ApiException as exc:
                status = exc.status or 0
                if status in ok_status:
                    return status
                message = _error_message(exc)
                if status in (401, 403):
                    raise KubernetesPermissionError(
                        f"{what}: forbidden ({status}): {message}", status=status, reason=exc.reason
                    ) from None
                if status not in _RETRYABLE_STATUS:
                    raise KubernetesApiError(
                        f"{what}: {status} {exc.reason}: {message}", status=status, reason=exc.reason
                    ) from None
                last = f"{status} {exc.reason}: {message}"
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            except ValueError as exc:  # the client's own validation of the request body
                raise KubernetesApiError(f"{what}: request rejected by the client: {exc}") from None
            except RuntimeError as exc:  # executor shut down
                raise KubernetesBackendError(f"{what}: {exc}") from None
            if attempt < s.api_retry_attempts:
                delay = min(s.api_retry_max_delay_seconds, s.api_retry_base_delay_seconds * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
        raise KubernetesUnavailableError(
            f"{what}: Kubernetes API unavailable after {s.api_retry_attempts} attempts: {last}"
        )

    # --- SchedulerBackend ------------------------------------------------------------------
    def _kind(self, group: bool) -> _Kind:
        return self._group if group else self._deployment

    def _cache(self, group: bool) -> WatchCache:
        return self.groups if group else self.deployments

    def _groups_served(self) -> bool:
        """False once the LeaderWorkerSet watch found the API not served (no CRD): no
        LeaderWorkerSet can exist, so no call about one is made."""
        return not (self.groups.synced.is_set() and not self.groups.served)

    async def ensure(self, spec: WorkloadSpec) -> None:
        obj = workload_object_manifest(spec, self.settings)  # invalid specs fail before any call
        service_manifest(spec, self.settings, None)
        await self.start()
        group = spec.nodes > 1
        kind, name = self._kind(group), obj["metadata"]["name"]
        if await self._replacing(name, group):
            return
        try:
            created = await self._call(f"create {kind.what} {name}", kind.create, obj, ok_status=(409,))
        except KubernetesApiError as exc:
            if group and exc.status == 404:  # the LeaderWorkerSet API is not served here
                raise KubernetesApiError(
                    f"{exc}; {spec.role} {spec.workload_id!r} needs {spec.nodes} nodes, which runs as a "
                    f"{LWS_API_VERSION} LeaderWorkerSet: install the LeaderWorkerSet controller in the "
                    "cluster (docs/kubernetes.md, Multi-node trainers and samplers)",
                    status=exc.status,
                    reason=exc.reason,
                ) from None
            raise
        if created == 409:
            existing = await self._call(f"get {kind.what} {name}", kind.read, name, ok_status=(404,))
            if existing == 404:  # deleted in between: the next ensure creates it
                log.info("k8s workload object vanished during ensure", name=name, kind=kind.what)
                return
            assert isinstance(existing, dict)
            self._cache(group).upsert(existing)
            meta = existing.get("metadata") or {}
            if meta.get("deletionTimestamp"):
                log.info("k8s workload object is being deleted; ensure again once it is gone", name=name)
                return
            if (meta.get("annotations") or {}).get(ANN_SPEC_HASH) != obj["metadata"]["annotations"][ANN_SPEC_HASH]:
                log.warning(
                    "k8s workload object exists with a different spec; left unchanged (remove it to apply)",
                    name=name,
                    kind=kind.what,
                )
            owner = existing
        else:
            assert isinstance(created, dict)
            self._cache(group).upsert(created)
            owner = created
        uid = (owner.get("metadata") or {}).get("uid")
        if not uid:
            log.warning("k8s workload object has no uid; service created without owner reference", name=name)
        svc = service_manifest(spec, self.settings, uid)
        if svc is not None:
            await self._call(
                f"create service {name}", self._core.create_namespaced_service, self.namespace, svc, ok_status=(409,)
            )

    async def _replacing(self, name: str, group: bool) -> bool:
        """True while the workload still has an object of the other kind (its spec changed
        between one pod and a multi-node group) or pods of it: that object is deleted (with the
        Service, whose selector and owner differ) and the new one waits until it is all gone."""
        other = not group
        if other and not self._groups_served():
            old = None
        elif self._cache(other).synced.is_set():
            old = self._cache(other).get(name)
        else:
            got = await self._call(
                f"get {self._kind(other).what} {name}", self._kind(other).read, name, ok_status=(404,)
            )
            old = got if isinstance(got, dict) else None
        if old is None:
            pods = await self._pods_of(name)
            return any(_is_group_pod(p) == other for p in pods)
        if not (old.get("metadata") or {}).get("deletionTimestamp"):
            log.info(
                "k8s workload changes kind; deleting the old object first",
                name=name,
                old=self._kind(other).what,
                new=self._kind(group).what,
            )
            await self._delete_object(other, name)
            await self._call(
                f"delete service {name}", self._core.delete_namespaced_service, name, self.namespace, ok_status=(404,)
            )
        return True

    async def _delete_object(self, group: bool, name: str) -> None:
        kind = self._kind(group)
        await self._call(
            f"delete {kind.what} {name}", kind.delete, name, propagation_policy="Background", ok_status=(404,)
        )
        self._cache(group).discard(name)

    async def remove(self, workload_id: str, role: WorkloadRole) -> None:
        await self.start()
        name = workload_name(workload_id, role)
        await self._delete_object(False, name)
        if self._groups_served():
            await self._delete_object(True, name)
        await self._call(
            f"delete service {name}", self._core.delete_namespaced_service, name, self.namespace, ok_status=(404,)
        )

    async def scale(self, workload_id: str, role: WorkloadRole, replicas: int) -> None:
        if replicas < 0:
            raise KubernetesApiError(f"replicas must be >= 0, got {replicas}")
        await self.start()
        name = workload_name(workload_id, role)
        first = self.groups.get(name) is not None
        for group in (first, not first):
            if group and not self._groups_served():
                continue
            kind = self._kind(group)
            patched = await self._call(
                f"scale {kind.what} {name}",
                kind.patch,
                name,
                scale_patch(replicas),
                _content_type=_MERGE_PATCH,
                ok_status=(404,),
            )
            if patched != 404:
                assert isinstance(patched, dict)
                self._cache(group).upsert(patched)
                return
        raise WorkloadNotFoundError(
            f"cannot scale {role} {workload_id!r}: no deployment or leaderworkerset {name}", status=404
        )

    async def _read_workload(
        self, name: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:
        """A workload's Deployment and LeaderWorkerSet (None where absent) and pods, read
        directly (not from the watch caches)."""
        dep = await self._call(f"get deployment {name}", self._deployment.read, name, ok_status=(404,))
        lws: dict[str, Any] | int | None = None
        if self._groups_served():
            lws = await self._call(f"get leaderworkerset {name}", self._group.read, name, ok_status=(404,))
        pods = await self._read_pods(name)
        return (
            dep if isinstance(dep, dict) else None,
            lws if isinstance(lws, dict) else None,
            pods,
        )

    async def _pods_of(self, name: str) -> list[dict[str, Any]]:
        """A workload's pods: from the watch cache once it is synced, else listed directly."""
        if self.pods.synced.is_set():
            return [p for p in self.pods.values() if _workload_of(p) == name]
        return await self._read_pods(name)

    async def _read_pods(self, name: str) -> list[dict[str, Any]]:
        """A workload's pods, listed directly (not from the watch cache)."""
        listed = await self._call(
            "list pods", self._core.list_namespaced_pod, self.namespace, label_selector=f"{LABEL_WORKLOAD}={name}"
        )
        assert isinstance(listed, dict)
        return [p for p in listed.get("items") or [] if _workload_of(p) == name]

    async def observe(self, workload_id: str, role: WorkloadRole) -> Observation:
        name = workload_name(workload_id, role)
        if await self.wait_synced(timeout=min(5.0, self.settings.api_timeout_seconds)):
            deployment, lws = self.deployments.get(name), self.groups.get(name)
            pods = [p for p in self.pods.values() if _workload_of(p) == name]
        else:  # the watches cannot list (yet): read directly so errors surface
            deployment, lws, pods = await self._read_workload(name)
        return self._observation(workload_id, WorkloadRole(role), deployment, lws, pods)

    def _observation(
        self,
        workload_id: str,
        role: WorkloadRole,
        deployment: dict[str, Any] | None,
        lws: dict[str, Any] | None,
        pods: list[dict[str, Any]],
    ) -> Observation:
        """From the LeaderWorkerSet unless there is none, or it is on its way out while a
        Deployment replaces it; each kind judged on its own pods."""
        common: dict[str, Any] = dict(
            now=datetime.now(UTC),
            unschedulable_grace=self.settings.unschedulable_grace_seconds,
            cluster_domain=self.settings.cluster_domain,
            was_ready=self._was_ready,
        )
        if _is_current(lws, deployment):
            group_pods = [p for p in pods if _is_group_pod(p)]
            return observe_group(workload_id, role, lws, group_pods, **common)
        single_pods = [p for p in pods if not _is_group_pod(p)]
        return observe_workload(workload_id, role, deployment, single_pods, **common)

    async def list_workloads(self) -> list[tuple[str, WorkloadRole]]:
        """From the watch caches (no API call per controller pass); a direct LIST (by the
        managed-by label) while they are not synced."""
        if await self.wait_synced(timeout=min(5.0, self.settings.api_timeout_seconds)):
            items = self.deployments.values() + self.groups.values()
        else:
            items = []
            for group in (False, True):
                if group and not self._groups_served():
                    continue
                kind = self._kind(group)
                listed = await self._call(
                    f"list {kind.what}s", kind.list, label_selector=MANAGED_SELECTOR, ok_status=(404,) if group else ()
                )
                if isinstance(listed, dict):
                    items += listed.get("items") or []
        out: set[tuple[str, WorkloadRole]] = set()
        for item in items:
            meta = item.get("metadata") or {}
            labels = meta.get("labels") or {}
            if labels.get(LABEL_MANAGED_BY) != MANAGED_BY:  # selectors may be ignored (kmock)
                continue
            workload_id = (meta.get("annotations") or {}).get(ANN_WORKLOAD_ID)
            try:
                role = WorkloadRole(labels.get(LABEL_ROLE, ""))
            except ValueError:
                continue
            if workload_id:
                out.add((workload_id, role))
        return sorted(out)

    async def describe(self, workload_id: str, role: WorkloadRole, *, max_events: int = 20) -> WorkloadDescription:
        """Direct reads (get deployment, list pods, list events): no watch is started, so the
        admin CLI can call this from its own short-lived process."""
        role = WorkloadRole(role)
        name = workload_name(workload_id, role)
        deployment, lws, pods = await self._read_workload(name)
        obs = self._observation(workload_id, role, deployment, lws, pods)
        events: list[WorkloadEvent] = []
        if max_events > 0:
            raw = await self._call("list events", self._core.list_namespaced_event, self.namespace)
            assert isinstance(raw, dict)
            pod_names = {(p.get("metadata") or {}).get("name") for p in pods}
            events = _events_about(raw.get("items") or [], name, pod_names)[-max_events:]
        return WorkloadDescription(obs, _describe_details(self.namespace, name, deployment, lws, pods), events)

    async def logs(self, workload_id: str, role: WorkloadRole, query: LogQuery) -> list[LogLine]:
        """Direct reads (list pods, each pod's log): no watch is started."""
        role = WorkloadRole(role)
        now_ns = time.time_ns()
        if query.start_ns > min(query.end_ns, now_ns):
            return []
        pods = await self._read_pods(workload_name(workload_id, role))
        reads = [
            self._pod_log(pod, role.value, previous, query, now_ns)
            for pod in pods
            for previous in _log_sources(pod, role.value, query)
        ]
        found = await asyncio.gather(*reads)
        return select([line for lines in found for line in lines], query)

    async def _pod_log(
        self, pod: dict[str, Any], container: str, previous: bool, query: LogQuery, now_ns: int
    ) -> list[LogLine]:
        """One container's lines matching ``query`` (its oldest or newest ``limit`` of them)."""
        name = str((pod.get("metadata") or {}).get("name"))
        kwargs: dict[str, Any] = {"container": container, "timestamps": True}
        if previous:
            kwargs["previous"] = True
        since = -(-(now_ns - query.start_ns) // 10**9) + 1  # whole seconds, rounded up
        if query.start_ns > 0 and since < 10 * 365 * 86400:
            kwargs["since_seconds"] = since
        desc = query.direction == "desc"
        size, most = (_LOG_TAIL_LINES, _LOG_MAX_TAIL_LINES) if desc else (_LOG_BYTES, _LOG_MAX_BYTES)
        while True:
            bound = {"tail_lines": size} if desc else {"limit_bytes": size}
            raw = await self._call_raw(
                f"read log of pod {name}" + (" (previous container)" if previous else ""),
                self._core.read_namespaced_pod_log,
                name,
                self.namespace,
                **kwargs,
                **bound,
                ok_status=_SKIP_POD_STATUS,
            )
            if isinstance(raw, int):
                if raw >= 500:
                    log.warning("k8s pod log unavailable, skipped", pod=name, status=raw)
                return []
            if desc:  # the newest ``size`` lines: older ones may precede them
                parsed = parse_kubelet_log(raw.decode("utf-8", "replace"), name)
                complete = parsed.raw_lines < size or size >= most
                # lines before the first record belong to one that was cut off: next time
                lines = parsed.lines if complete else parsed.lines[parsed.first_record :]
                done = complete or (bool(lines) and lines[0].timestamp_ns < query.start_ns)
            else:  # the oldest ``size`` bytes: the last line may be cut
                cut = len(raw) >= size
                parsed = parse_kubelet_log(raw.decode("utf-8", "replace"), name, truncated_end=cut)
                lines = parsed.lines
                done = not cut or size >= most or (bool(lines) and lines[-1].timestamp_ns > query.end_ns)
            matching = [x for x in lines if in_query(x, query)]
            if done or len(matching) >= query.limit:
                return matching[-query.limit :] if desc else matching[: query.limit]
            size = min(size * 4, most)

    async def usage(self, workload_id: str, role: WorkloadRole) -> list[UsageSample]:
        """Direct reads (list pods, each running pod's PodMetrics): no watch is started."""
        role = WorkloadRole(role)
        pods = [
            p
            for p in await self._read_pods(workload_name(workload_id, role))
            if (p.get("status") or {}).get("phase") == "Running"
            and not (p.get("metadata") or {}).get("deletionTimestamp")
        ]
        metrics = await asyncio.gather(*(self._pod_metrics(p) for p in pods))
        return [usage_sample(p, m, role.value) for p, m in zip(pods, metrics, strict=True)]

    async def _pod_metrics(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        name = str((pod.get("metadata") or {}).get("name"))
        got = await self._call(
            f"get metrics of pod {name}",
            self._custom.get_namespaced_custom_object,
            "metrics.k8s.io",
            "v1beta1",
            self.namespace,
            "pods",
            name,
            ok_status=_SKIP_POD_STATUS,
        )
        return got if isinstance(got, dict) else None

    # --- pod readiness memory (UNHEALTHY vs STARTING) ----------------------------------------
    def _on_pod_event(self, etype: str, pod: dict[str, Any]) -> None:
        key = _pod_key(pod)
        if etype == "DELETED":
            self._seen_ready.discard(key)
            return
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Ready" and c.get("status") == "True":
                self._seen_ready.add(key)

    def _was_ready(self, pod: dict[str, Any]) -> bool:
        return _pod_key(pod) in self._seen_ready


def _workload_of(obj: dict[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_WORKLOAD)


def _is_group_pod(pod: dict[str, Any]) -> bool:
    """A pod of a LeaderWorkerSet (the LWS controller labels it with the set's name)."""
    return LABEL_LWS_NAME in ((pod.get("metadata") or {}).get("labels") or {})


def _is_current(lws: dict[str, Any] | None, deployment: dict[str, Any] | None) -> bool:
    """Whether a workload is observed through its LeaderWorkerSet: there is one, and it is not
    being deleted while a Deployment exists (a group replaced by a single pod)."""
    if lws is None:
        return False
    return not (lws.get("metadata") or {}).get("deletionTimestamp") or deployment is None


def _log_sources(pod: dict[str, Any], container: str, query: LogQuery) -> list[bool]:
    """Which logs of a pod's container can hold lines of ``query``: the current one (False)
    unless it started after ``end_ns``, the previous one (True, after a restart) unless it
    ended before ``start_ns``."""
    status = next(
        (c for c in (pod.get("status") or {}).get("containerStatuses") or [] if c.get("name") == container), None
    )
    if status is None:  # not reported yet: try (a container that never started answers 400)
        return [False]
    sources = []
    state = status.get("state") or {}
    started = parse_time((state.get("running") or state.get("terminated") or {}).get("startedAt"))
    if started is None or started.timestamp() * 1e9 <= query.end_ns + ORDER_SLACK_NS:
        sources.append(False)  # a container waiting to (re)start answers 400, or its last run's log
    last = (status.get("lastState") or {}).get("terminated")
    if int(status.get("restartCount") or 0) > 0 and last:
        finished = parse_time(last.get("finishedAt"))
        if finished is None or finished.timestamp() * 1e9 >= query.start_ns - ORDER_SLACK_NS:
            sources.append(True)
    return sources


def _describe_details(
    namespace: str,
    name: str,
    deployment: dict[str, Any] | None,
    lws: dict[str, Any] | None,
    pods: list[dict[str, Any]],
) -> dict[str, Any]:
    details: dict[str, Any] = {
        "namespace": namespace,
        "deployment": None,
        "leaderworkerset": None,
        "service": None,
        "pods": [],
    }
    if _is_current(lws, deployment):
        assert lws is not None
        details.update(
            leaderworkerset=name,
            group_size=group_size(lws),
            replicas=group_replicas(lws),
            ready_replicas=(lws.get("status") or {}).get("readyReplicas") or 0,  # groups
            service=name if leader_port(lws) is not None else None,
        )
    elif deployment is not None:
        spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        details.update(
            deployment=name,
            replicas=spec.get("replicas"),
            ready_replicas=status.get("readyReplicas") or 0,
            service=name if any(c.get("ports") for c in containers) else None,
        )
    for p in pods:
        meta, st = p.get("metadata") or {}, p.get("status") or {}
        statuses = st.get("containerStatuses") or []
        entry = {
            "name": meta.get("name"),
            "phase": st.get("phase"),
            "node": (p.get("spec") or {}).get("nodeName"),
            "ready": bool(statuses) and all(c.get("ready") for c in statuses),
            "restarts": sum(int(c.get("restartCount") or 0) for c in statuses),
        }
        if _is_group_pod(p):
            entry["group_role"] = pod_role(p)
        details["pods"].append(entry)
    return details


def _events_about(items: list[dict[str, Any]], name: str, pod_names: set[Any]) -> list[WorkloadEvent]:
    """Events whose object is the Deployment, one of its ReplicaSets (``{name}-{hash}``), the
    LeaderWorkerSet, one of its StatefulSets (``{name}``, ``{name}-{group}``) or one of the
    pods, oldest first."""
    out: list[tuple[str, WorkloadEvent]] = []
    for ev in items:
        obj = ev.get("involvedObject") or {}
        oname, kind = obj.get("name") or "", obj.get("kind") or ""
        mine = (
            (kind == "Deployment" and oname == name)
            or (kind == "ReplicaSet" and oname.startswith(name + "-") and "-" not in oname[len(name) + 1 :])
            or (kind == "LeaderWorkerSet" and oname == name)
            or (
                kind == "StatefulSet"
                and (oname == name or (oname.startswith(name + "-") and oname[len(name) + 1 :].isdigit()))
            )
            or (kind == "Pod" and oname in pod_names)
        )
        if not mine:
            continue
        when = (
            ev.get("lastTimestamp")
            or ev.get("eventTime")
            or ev.get("firstTimestamp")
            or (ev.get("metadata") or {}).get("creationTimestamp")
            or ""
        )
        out.append(
            (
                str(when),
                WorkloadEvent(
                    message=str(ev.get("message") or ""),
                    reason=ev.get("reason"),
                    type=ev.get("type"),
                    object=f"{kind}/{oname}",
                    time=str(when) or None,
                    count=ev.get("count"),
                ),
            )
        )
    out.sort(key=lambda x: x[0])
    return [e for _, e in out]


def _pod_key(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return str(meta.get("uid") or meta.get("name"))


__all__ = ["KubernetesBackend", "build_configuration"]
