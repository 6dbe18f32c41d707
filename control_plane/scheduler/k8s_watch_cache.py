"""A namespace's Deployments, LeaderWorkerSets or Pods, kept in memory by a list+watch loop
(read by ``KubernetesBackend.observe`` and ``list_workloads`` instead of an API call each).

An *optional* resource (a custom resource such as LeaderWorkerSet, whose CRD a cluster may not
have) that the API server answers 404 for is taken as empty and synced; it is listed again
after ``resync_seconds`` (the CRD may be installed later).

Loop: LIST (remember its resourceVersion), then WATCH from that resourceVersion with bookmarks;
when a watch ends (server timeout, read timeout, dropped connection) it restarts from the last
resourceVersion seen, without a relist. A 410 Gone (as an ERROR event or an HTTP status) or any
other error leads to a full relist (errors with exponential backoff). A full relist also happens
every ``resync_seconds``, which repairs anything a watch could have missed. The backend's own
writes go in at once (``upsert``/``discard``: read-your-writes).

The LIST/WATCH function is given by the backend (raw HTTP responses; API errors as
``KubernetesApiError``): this module does not import ``kubernetes``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog
import urllib3

from control_plane.scheduler.k8s_errors import KubernetesApiError
from control_plane.scheduler.k8s_manifests import LABEL_MANAGED_BY, MANAGED_BY
from control_plane.scheduler.kubernetes_settings import KubernetesSettings

log = structlog.get_logger("openloops.scheduler.kubernetes")

MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


def _lines(resp: Any) -> Iterator[str]:
    """The lines of a streamed watch response (one JSON event each), as they arrive."""
    pending = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


def _rv_int(obj: dict[str, Any]) -> int | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(rv) if rv is not None else None
    except (TypeError, ValueError):
        return None


class _Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): relist."""


class WatchCache:
    """Keeps ``cache`` (name -> object dict) equal to one resource in one namespace.

    Loop: LIST (remember its resourceVersion), then WATCH from that resourceVersion with
    bookmarks; when a watch ends (server timeout, read timeout, dropped connection) it restarts
    from the last resourceVersion seen, without a relist. A 410 Gone (as an ERROR event or an
    HTTP status) or any other error leads to a full relist (errors with exponential backoff). A
    full relist also happens every ``resync_seconds`` (checked on each event and each watch
    restart), which repairs anything a watch could have missed.
    """

    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        namespace: str,
        settings: KubernetesSettings,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        *,
        optional: bool = False,
    ) -> None:
        self.kind = kind
        self.optional = optional
        self.served = True  # False while an optional resource is not served (404)
        self._list_fn = list_fn
        self._namespace = namespace
        self._settings = settings
        self._on_event = on_event
        self.lock = threading.Lock()
        self.cache: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.relists = 0
        self.watches = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp: Any = None
        self._last_list = 0.0

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"openloops-k8s-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            try:  # unblock a read in progress
                resp.shutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    # --- cache writes from our own API responses (read-your-writes) ----------------------
    def upsert(self, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        self.served = True  # the API server just answered with one (e.g. a CRD installed since)
        with self.lock:
            old = self.cache.get(name)
            if old is not None:
                new_rv, old_rv = _rv_int(obj), _rv_int(old)
                if new_rv is not None and old_rv is not None and new_rv < old_rv:
                    return  # stale
            self.cache[name] = obj
        if self._on_event:
            self._on_event("MODIFIED", obj)

    def discard(self, name: str) -> None:
        with self.lock:
            obj = self.cache.pop(name, None)
        if obj is not None and self._on_event:
            self._on_event("DELETED", obj)

    def get(self, name: str) -> dict[str, Any] | None:
        with self.lock:
            return self.cache.get(name)

    def values(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.cache.values())

    # --- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        need_list = True
        delay = self._settings.api_retry_base_delay_seconds or 0.1
        while not self._stop.is_set():
            try:
                if need_list or self._resync_due():
                    self._relist()
                    need_list = False
                self._watch_once()
                delay = self._settings.api_retry_base_delay_seconds or 0.1
            except _Gone:
                log.info("k8s watch expired (410 Gone), relisting", kind=self.kind)
                need_list = True
            except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
                continue  # the stream went quiet or was cut: resume from the last resourceVersion
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                if self._stop.is_set():
                    break
                if isinstance(exc, KubernetesApiError) and exc.status == 410:
                    need_list = True
                    continue
                if self.optional and isinstance(exc, KubernetesApiError) and exc.status == 404:
                    self._not_served()
                    need_list = True
                    self._stop.wait(self._settings.resync_seconds)
                    continue
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("k8s list/watch failed, retrying", kind=self.kind, error=self.last_error, delay=delay)
                need_list = True
                self._stop.wait(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self._settings.api_retry_max_delay_seconds or 8.0)

    def _not_served(self) -> None:
        """An optional resource the API server does not serve: empty, and synced."""
        if self.served:
            log.info("k8s resource not served by the API server; taken as empty", kind=self.kind)
        self.served = False
        with self.lock:
            old, self.cache = self.cache, {}
        self.resource_version = None
        self._last_list = time.monotonic()
        self.last_error = None
        self.synced.set()
        if self._on_event:
            for obj in old.values():
                self._on_event("DELETED", obj)

    def _resync_due(self) -> bool:
        return time.monotonic() - self._last_list >= self._settings.resync_seconds

    def _read_timeout(self) -> float:
        return self._settings.watch_timeout_seconds * 1.2 + 0.5

    def _relist(self) -> None:
        resp = self._list_fn(
            self._namespace,
            label_selector=MANAGED_SELECTOR,
            _preload_content=False,
            _request_timeout=self._settings.api_timeout_seconds,
        )
        data = json.loads(resp.data or b"{}")
        fresh: dict[str, dict[str, Any]] = {}
        for item in data.get("items") or []:
            meta = item.get("metadata") or {}
            # the server filters by label; a server that does not (kmock) is filtered here
            if (meta.get("labels") or {}).get(LABEL_MANAGED_BY) != MANAGED_BY:
                continue
            if meta.get("namespace") not in (None, self._namespace):
                continue
            fresh[meta["name"]] = item
        with self.lock:
            old = self.cache
            self.cache = fresh
        self.resource_version = (data.get("metadata") or {}).get("resourceVersion") or None
        self._last_list = time.monotonic()
        self.relists += 1
        self.served = True
        self.last_error = None
        self.synced.set()
        if self._on_event:
            for name, obj in old.items():
                if name not in fresh:
                    self._on_event("DELETED", obj)
            for obj in fresh.values():
                self._on_event("ADDED", obj)

    def _watch_once(self) -> None:
        kwargs: dict[str, Any] = {
            "label_selector": MANAGED_SELECTOR,
            "watch": True,
            "allow_watch_bookmarks": True,
            "timeout_seconds": self._settings.watch_timeout_seconds,
            "_preload_content": False,
            "_request_timeout": (self._settings.api_timeout_seconds, self._read_timeout()),
        }
        if self.resource_version:
            kwargs["resource_version"] = self.resource_version
        resp = self._list_fn(self._namespace, **kwargs)
        self._resp = resp
        self.watches += 1
        try:
            if self._stop.is_set():  # stop() ran before it could see this response
                return
            for line in _lines(resp):
                if self._stop.is_set():
                    return
                if not line:
                    continue
                self._apply(json.loads(line))
                if self._resync_due():
                    return
        finally:
            self._resp = None
            try:
                resp.release_conn()
            except Exception:  # noqa: BLE001
                pass

    def _apply(self, event: dict[str, Any]) -> None:
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise KubernetesApiError(
                f"watch {self.kind}: {obj.get('reason')}: {obj.get('message')}",
                status=obj.get("code"),
                reason=obj.get("reason"),
            )
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        name = meta.get("name")
        if not name:
            return
        if (meta.get("labels") or {}).get(LABEL_MANAGED_BY) != MANAGED_BY or meta.get("namespace") not in (
            None,
            self._namespace,
        ):
            return
        with self.lock:
            if etype == "DELETED":
                self.cache.pop(name, None)
            elif etype in ("ADDED", "MODIFIED"):
                old = self.cache.get(name)
                new_rv, old_rv = _rv_int(obj), (_rv_int(old) if old is not None else None)
                if not (new_rv is not None and old_rv is not None and new_rv < old_rv):
                    self.cache[name] = obj
        if rv:
            self.resource_version = rv
        if self._on_event:
            self._on_event(etype or "", obj)
