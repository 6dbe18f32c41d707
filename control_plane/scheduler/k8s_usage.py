"""Pure mapping of a pod and its ``metrics.k8s.io/v1beta1`` PodMetrics (plain dicts as the API
returns them) to a ``UsageSample``. No I/O, no ``kubernetes`` import."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from control_plane.scheduler.protocol import UsageSample

_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?")
_FACTORS = {
    None: Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity (``250m``, ``12345678n``, ``1``, ``1.5``, ``123456Ki``, ``1Gi``,
    ``1e3``) as a number; None when it is not one."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Decimal(str(value))
    if not isinstance(value, str):
        return None
    m = _QUANTITY.fullmatch(value.strip())
    if m is None:
        return None
    try:
        return Decimal(m.group(1)) * _FACTORS[m.group(2)]
    except InvalidOperation:
        return None


def cpu_cores(value: Any) -> float | None:
    q = parse_quantity(value)
    return float(q) if q is not None else None


def quantity_bytes(value: Any) -> int | None:
    q = parse_quantity(value)
    return int(q.to_integral_value()) if q is not None else None


def usage_sample(pod: dict[str, Any], metrics: dict[str, Any] | None, container: str) -> UsageSample:
    """``metrics``: the pod's PodMetrics, or None when the metrics API has none (no
    metrics-server, or the pod is too new to have been scraped): CPU and memory are then None.
    CPU and memory are the sums over the pod's containers. ephemeral_bytes is None (the
    metrics API does not report disk; the kubelet's stats summary would need ``nodes/proxy``);
    ephemeral_capacity_bytes is the ``ephemeral-storage`` limit of the workload's container."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    cpu: float | None = None
    memory: int | None = None
    if metrics is not None:
        containers = metrics.get("containers") or []
        cpus = [cpu_cores((c.get("usage") or {}).get("cpu")) for c in containers]
        mems = [quantity_bytes((c.get("usage") or {}).get("memory")) for c in containers]
        if containers and all(x is not None for x in cpus):
            cpu = round(sum(x for x in cpus if x is not None), 6)
        if containers and all(x is not None for x in mems):
            memory = sum(x for x in mems if x is not None)
    capacity = None
    for c in spec.get("containers") or []:
        if c.get("name") == container:
            capacity = quantity_bytes(((c.get("resources") or {}).get("limits") or {}).get("ephemeral-storage"))
    return UsageSample(
        replica=str(meta.get("name") or ""),
        node=spec.get("nodeName"),
        cpu_cores=cpu,
        memory_bytes=memory,
        ephemeral_bytes=None,
        ephemeral_capacity_bytes=capacity,
    )


__all__ = ["cpu_cores", "parse_quantity", "quantity_bytes", "usage_sample"]
