"""Validation of a rendered LeaderWorkerSet: the vendored v1 CRD schema (tests/k8s/schemas/,
unknown fields rejected) for the object, Kubernetes' own PodTemplateSpec schema for its two pod
templates (the schemas the Deployments are checked against)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.32.0"
SCHEMA = Path(__file__).parent / "schemas" / "leaderworkerset.x-k8s.io_v1.yaml"


def _strict(node: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object lists its properties
    and does not keep unknown fields itself (structural schemas prune those silently; strict
    field validation rejects them)."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_strict(yaml.safe_load(SCHEMA.read_text())))


def validate_leader_worker_set(doc: dict[str, Any]) -> None:
    """Raises ``jsonschema.ValidationError`` or ``kubernetes_validate.ValidationError``."""
    assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and doc["kind"] == "LeaderWorkerSet"
    validator().validate(doc)
    lwt = doc["spec"]["leaderWorkerTemplate"]
    for which in ("leaderTemplate", "workerTemplate"):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": lwt[which]}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
