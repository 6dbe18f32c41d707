"""The Helm chart: lint, render, strict validation of every object, the values schema, and the
configuration the control plane really receives (parsed by the real ``Settings``)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from control_plane.catalog import CatalogFile
from control_plane.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "openloops"
K8S_VERSION = "1.32.0"
RELEASE, NAMESPACE = "openloops", "openloops"

VALUES_FILES = {
    "default": None,
    "gpu-example": ROOT / "helm" / "examples" / "values-gpu.yaml",
    "all-options": Path(__file__).parent / "values-all-options.yaml",
}


def load_values(name: str) -> dict[str, Any]:
    path = VALUES_FILES[name]
    return yaml.safe_load(path.read_text()) if path else {}


def render(values: dict[str, Any], *, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    out = helm.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=namespace)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(values: dict[str, Any]) -> str:
    out = helm.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=NAMESPACE)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, (kind, name_suffix, [d["metadata"]["name"] for d in by_kind(docs, kind)])
    return found[0]


def control_plane(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = by_kind(docs, "Deployment")
    return dep


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def settings_from(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch, secrets: dict[str, str]) -> Settings:
    """What `openloops serve` would load from this container's environment."""
    for name, e in env_of(container).items():
        if "value" in e:
            monkeypatch.setenv(name, e["value"])
        elif name in secrets:
            monkeypatch.setenv(name, secrets[name])
    return Settings()


@pytest.mark.parametrize("case", list(VALUES_FILES))
def test_chart_lints_strictly(case: str) -> None:
    result = helm.lint(str(CHART), load_values(case), strict=True, namespace=NAMESPACE)
    assert result["errors"] == []
    assert all(m["severity"] < 2 for m in result["messages"]), result["messages"]


@pytest.mark.parametrize("case", list(VALUES_FILES))
def test_every_rendered_object_validates_strictly(case: str) -> None:
    docs = render(load_values(case))
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Job",
        "Pod",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_broken_render() -> None:
    docs = render({"replicaCount": 2})
    dep = control_plane(docs)
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_default_install(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render(
        {
            "database": {"url": "postgresql+asyncpg://u:p@db:5432/ol"},
            "redis": {"url": "redis://r:6379/0"},
            "s3": {"bucket": "b", "accessKeyId": "AK", "secretAccessKey": "SK"},
        }
    )
    dep = control_plane(docs)
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["openloops", "serve"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["serviceAccountName"] == "openloops"

    secret = one(docs, "Secret", "openloops")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["database-url"] == "postgresql+asyncpg://u:p@db:5432/ol"
    assert len(data["signing-secret"]) == 48  # generated
    # credentials only through secret references
    env = env_of(c)
    for name, key in [
        ("OPENLOOPS_DATABASE_URL", "database-url"),
        ("OPENLOOPS_REDIS_URL", "redis-url"),
        ("OPENLOOPS_SIGNING_SECRET", "signing-secret"),
        ("AWS_ACCESS_KEY_ID", "s3-access-key-id"),
        ("AWS_SECRET_ACCESS_KEY", "s3-secret-access-key"),
    ]:
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "openloops", "key": key}
    assert "u:p@" not in json.dumps(dep)

    secrets = {"OPENLOOPS_DATABASE_URL": data["database-url"], "OPENLOOPS_REDIS_URL": data["redis-url"]}
    s = settings_from(c, monkeypatch, secrets)
    assert s.backend == "kubernetes" and s.host == "0.0.0.0" and s.port == 8000
    assert s.store_kind == "s3" and s.s3_bucket == "b"
    assert str(s.model_catalog_path) == "/etc/openloops/catalog/catalog.yaml"
    k = s.kubernetes
    assert k.in_cluster and k.namespace == NAMESPACE
    assert k.trainer_image == "openloops/trainer:0.1.0" and k.sampler_image == "openloops/sampler:0.1.0"
    assert k.worker_secret_name == "openloops-worker" and k.service_account_name == "openloops-worker"
    assert k.image_pull_secrets == [] and k.node_selector == {} and k.tolerations == []
    assert k.spot_node_selector == {} and k.spot_tolerations == [] and not k.spot_configured
    assert k.trainer_termination_grace_period_seconds == 120

    worker_secret = one(docs, "Secret", "-worker")
    assert worker_secret["metadata"]["namespace"] == NAMESPACE
    wdata = {k: base64.b64decode(v).decode() for k, v in worker_secret["data"].items()}
    assert wdata == {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "OPENLOOPS_REDIS_URL": "redis://r:6379/0",
        "HF_TOKEN": "",
    }
    wsa = one(docs, "ServiceAccount", "-worker")
    assert wsa["automountServiceAccountToken"] is False

    # migrations: a pre-install/pre-upgrade hook with its own short-lived Secret
    job = one(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    hook_secret = one(docs, "Secret", "-migrate")
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    (jc,) = job["spec"]["template"]["spec"]["containers"]
    assert jc["command"] == ["openloops", "admin", "db", "upgrade"]
    assert env_of(jc)["OPENLOOPS_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "openloops-migrate",
        "key": "database-url",
    }
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False

    # helm test pod
    test_pod = one(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["command"][-1] == "http://openloops.openloops.svc:8000/healthz"

    # the Service, PDB and NetworkPolicy select the control-plane pods only
    selector = dep["spec"]["selector"]["matchLabels"]
    assert one(docs, "Service")["spec"]["selector"] == selector
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    for other in (job["spec"]["template"], test_pod):
        assert not selector.items() <= other["metadata"]["labels"].items()
    netpol = one(docs, "NetworkPolicy")
    assert netpol["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "openloops"}}
    assert netpol["spec"]["ingress"] == [
        {
            "from": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
                    "podSelector": {"matchLabels": selector},
                }
            ]
        }
    ]
    # worker pods are labelled managed-by=openloops; the chart's own pods are not
    for d in docs:
        labels = (d.get("spec", {}).get("template", {}).get("metadata", {}) or {}).get("labels", {})
        assert labels.get("app.kubernetes.io/managed-by") != "openloops"
    assert not by_kind(docs, "Ingress") and not by_kind(docs, "Namespace")


def test_gpu_example(monkeypatch: pytest.MonkeyPatch) -> None:
    values = load_values("gpu-example")
    docs = render(values)
    # existingSecret: the chart creates no Secret at all
    assert by_kind(docs, "Secret") == []
    dep = control_plane(docs)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = env_of(c)
    assert env["OPENLOOPS_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "openloops-credentials",
        "key": "database-url",
    }
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["optional"] is True
    (jc,) = one(docs, "Job")["spec"]["template"]["spec"]["containers"]
    assert env_of(jc)["OPENLOOPS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "openloops-credentials"

    s = settings_from(
        c, monkeypatch, {"OPENLOOPS_DATABASE_URL": "postgresql+asyncpg://x/y", "OPENLOOPS_REDIS_URL": "redis://r"}
    )
    k = s.kubernetes
    assert k.namespace == "openloops-workloads"
    assert k.trainer_image == "registry.example.com/openloops/trainer:0.1.0"
    assert k.sampler_image == "registry.example.com/openloops/sampler:0.1.0"
    assert k.image_pull_secrets == ["regcred"]
    assert k.node_selector == {"node-pool": "gpu"}
    assert k.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert k.spot_node_selector == {"node-pool": "gpu-spot"}
    assert k.spot_tolerations == [{"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
    assert k.worker_secret_name == "openloops-worker-credentials"
    assert k.startup_timeout_seconds == 2700 and k.unschedulable_grace_seconds == 900
    assert s.public_base_url == "https://openloops.example.com"

    # RBAC, worker ServiceAccount and NetworkPolicy live in the workloads namespace
    for kind in ("Role", "RoleBinding", "NetworkPolicy"):
        assert one(docs, kind)["metadata"]["namespace"] == "openloops-workloads"
    rb = one(docs, "RoleBinding")
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "openloops", "namespace": NAMESPACE}]
    assert one(docs, "ServiceAccount", "-worker")["metadata"]["namespace"] == "openloops-workloads"

    # the catalog ConfigMap is what the control plane's catalog loader accepts
    cm = one(docs, "ConfigMap")
    catalog = CatalogFile.model_validate(yaml.safe_load(cm["data"]["catalog.yaml"]))
    assert [m.name for m in catalog.models] == ["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-70B-Instruct"]
    assert catalog.models[0].resources.sampler.shm == "8Gi"
    assert catalog.models[1].vllm_args == ["--tensor-parallel-size", "4", "--max-lora-rank", "64"]
    vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "catalog")
    assert vol["configMap"]["name"] == cm["metadata"]["name"]

    ing = one(docs, "Ingress")
    assert ing["spec"]["tls"] == [{"hosts": ["openloops.example.com"], "secretName": "openloops-tls"}]


def test_all_options_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    values = load_values("all-options")
    docs = render(values)
    names = {d["metadata"]["name"] for d in docs}
    assert "openloops-all" in names and "ml-workloads" in names
    ns = one(docs, "Namespace")
    assert ns["metadata"]["name"] == "ml-workloads"
    dep = control_plane(docs)
    spec = dep["spec"]
    tmpl = spec["template"]
    pod = tmpl["spec"]
    (c,) = pod["containers"]
    assert spec["replicas"] == 3
    assert c["image"] == "registry.example.com/openloops/control-plane:9.9.9" and c["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert pod["serviceAccountName"] == "openloops-cp"
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"node-pool": "system"}
    assert pod["tolerations"][0]["value"] == "system"
    assert "podAntiAffinity" in pod["affinity"] and pod["topologySpreadConstraints"][0]["maxSkew"] == 1
    assert pod["securityContext"]["runAsUser"] == 2000
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    assert tmpl["metadata"]["labels"]["team"] == "ml-platform"
    assert tmpl["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    env = env_of(c)
    assert env["OPENLOOPS_RATE_LIMIT_PER_SECOND"]["value"] == "100"
    assert env["EXTRA_FROM_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "extra", "key": "value"}
    assert env["OPENLOOPS_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "openloops-all", "key": "db"}

    s = settings_from(
        c,
        monkeypatch,
        {
            "OPENLOOPS_DATABASE_URL": values["database"]["url"],
            "OPENLOOPS_REDIS_URL": values["redis"]["url"],
            "OPENLOOPS_SIGNING_SECRET": values["signingSecret"],
        },
    )
    assert s.public_base_url == "https://api.openloops.example.com"
    assert s.log_level == "debug" and s.log_json is False
    assert (s.s3_bucket, s.s3_endpoint_url, s.s3_region, s.s3_prefix) == (
        "ckpts",
        "http://minio.storage:9000",
        "eu-west-1",
        "openloops/",
    )
    assert s.signing_secret is not None and s.signing_secret.get_secret_value() == "s3cr3t-signing-key"
    k = s.kubernetes
    assert k.namespace == "ml-workloads"
    assert k.trainer_image.endswith("trainer:9.9.9-cuda") and k.sampler_image.endswith("sampler:9.9.9-vllm")
    assert k.image_pull_policy == "Always" and k.image_pull_secrets == ["regcred"]
    assert k.node_selector == {"node-pool": "gpu"} and len(k.tolerations) == 2
    assert k.tolerations[1]["tolerationSeconds"] == 300
    assert k.spot_node_selector == {"kubernetes.azure.com/scalesetpriority": "spot", "node-pool": "gpu-spot"}
    assert k.spot_tolerations == [
        {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot", "effect": "NoSchedule"}
    ]
    assert k.trainer_termination_grace_period_seconds == 300
    assert k.priority_class_name == "ml-high" and k.service_account_name == "ml-worker"
    assert k.worker_secret_name == "openloops-all-worker"
    assert (k.gpu_resource_name, k.gpu_type_label, k.tolerate_gpu_taint) == (
        "nvidia.com/gpu",
        "cloud.google.com/gke-accelerator",
        False,
    )
    assert (k.startup_timeout_seconds, k.unschedulable_grace_seconds, k.cluster_domain) == (3600, 600, "k8s.internal")

    secret = one(docs, "Secret", "openloops-all")
    assert set(secret["data"]) == {"db", "redis", "s3-id", "s3-key", "signing"}
    wsecret = one(docs, "Secret", "openloops-all-worker")
    assert wsecret["metadata"]["namespace"] == "ml-workloads"
    assert base64.b64decode(wsecret["data"]["HF_TOKEN"]).decode() == "hf_abc"
    wsa = one(docs, "ServiceAccount", "ml-worker")
    assert wsa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("openloops-worker")

    svc = one(docs, "Service")
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["ports"][0]["port"] == 8080
    assert svc["metadata"]["annotations"] == values["service"]["annotations"]
    ing = one(docs, "Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"][0]["secretName"] == "openloops-all-tls"
    assert ing["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == "25%"
    job = one(docs, "Job")
    assert job["spec"]["backoffLimit"] == 5 and job["spec"]["activeDeadlineSeconds"] == 1200
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"memory": "512Mi"}
    netpol = one(docs, "NetworkPolicy")
    assert netpol["spec"]["ingress"][1] == values["networkPolicy"]["extraIngress"][0]
    test_pod = one(docs, "Pod")
    assert test_pod["spec"]["containers"][0]["image"] == "registry.example.com/curl:8.11.1"
    assert test_pod["spec"]["containers"][0]["command"][-1] == "http://openloops-all.openloops.svc:8080/healthz"


def test_options_switch_objects_off() -> None:
    docs = render(
        {
            "rbac": {"create": False},
            "networkPolicy": {"enabled": False},
            "podDisruptionBudget": {"enabled": False},
            "migrations": {"enabled": False},
            "serviceAccount": {"create": False, "name": "pre-made"},
            "workloads": {"serviceAccount": {"create": False, "name": ""}},
            "modelCatalog": {"existingConfigMap": "my-catalog"},
        }
    )
    kinds = [d["kind"] for d in docs]
    for kind in ("Role", "RoleBinding", "NetworkPolicy", "PodDisruptionBudget", "Job", "ServiceAccount", "ConfigMap"):
        assert kind not in kinds
    pod = control_plane(docs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "pre-made"
    assert next(v for v in pod["volumes"] if v["name"] == "catalog")["configMap"]["name"] == "my-catalog"
    assert "OPENLOOPS_KUBERNETES__SERVICE_ACCOUNT_NAME" not in env_of(pod["containers"][0])


def test_existing_secret_needs_a_worker_secret() -> None:
    with pytest.raises(helm.HelmError, match="workloads.existingSecret is required"):
        render({"existingSecret": "creds"})


def test_notes_warn_about_missing_configuration() -> None:
    text = notes({})
    assert "WARNING: database.url is empty" in text and "WARNING: the model catalog is empty" in text
    text = notes(load_values("gpu-example"))
    assert "WARNING" not in text and "helm test openloops" in text


BAD_VALUES = [
    pytest.param({"replicaCount": "three"}, "replicaCount", id="wrong-type"),
    pytest.param({"bogus": 1}, "bogus", id="unknown-top-level-key"),
    pytest.param({"workloads": {"gpuu": {}}}, "gpuu", id="unknown-nested-key"),
    pytest.param({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "pullPolicy", id="bad-enum"),
    pytest.param({"database": {"url": "mysql://u:p@h/db"}}, "database", id="not-postgres"),
    pytest.param({"service": {"port": 70000}}, "port", id="port-range"),
    pytest.param({"workloads": {"namespace": "Bad_NS"}}, "namespace", id="bad-namespace"),
    pytest.param({"resources": {"limits": {"memory": "lots"}}}, "memory", id="bad-quantity"),
    pytest.param({"networkPolicy": {"enabled": "yes"}}, "enabled", id="bool-as-string"),
    pytest.param({"workloads": {"tolerations": [{"key": "a", "operator": "Maybe"}]}}, "operator", id="bad-toleration"),
    pytest.param(
        {"workloads": {"spot": {"tolerations": [{"key": "a", "effect": "Sometimes"}]}}},
        "effect",
        id="bad-spot-toleration",
    ),
    pytest.param({"workloads": {"spot": {"nodeSelector": {"a": 1}}}}, "nodeSelector", id="spot-selector-not-strings"),
    pytest.param({"workloads": {"spot": {"affinity": {}}}}, "affinity", id="unknown-spot-key"),
    pytest.param(
        {"workloads": {"trainerTerminationGracePeriodSeconds": -1}}, "trainerTermination", id="negative-grace"
    ),
    pytest.param({"modelCatalog": {"models": [{"name": "m"}]}}, "source", id="catalog-missing-source"),
    pytest.param(
        {"modelCatalog": {"models": [{"name": "m", "source": "s", "resources": {"trainer": {"gpus": "one"}}}]}},
        "gpus",
        id="catalog-bad-gpus",
    ),
    pytest.param(
        {"modelCatalog": {"models": [{"name": "m", "source": "s", "maxContext": 5}]}},
        "maxContext",
        id="catalog-unknown-field",
    ),
    pytest.param({"imagePullSecrets": [{"name": "x"}]}, "imagePullSecrets", id="pull-secrets-are-names"),
    pytest.param(
        {"modelCatalog": {"models": [{"name": "m", "source": "s", "resources": {"trainer": {"nodes": 0}}}]}},
        "nodes",
        id="catalog-zero-nodes",
    ),
]


def test_catalog_nodes_reach_the_control_plane() -> None:
    """A multi-node trainer in the values is what the control plane's catalog loader reads."""
    docs = render(load_values("all-options"))
    cm = next(d for d in by_kind(docs, "ConfigMap") if "catalog.yaml" in d.get("data", {}))
    catalog = CatalogFile.model_validate(yaml.safe_load(cm["data"]["catalog.yaml"]))
    resources = catalog.models[0].resources
    assert (resources.trainer.nodes, resources.sampler.nodes) == (2, 1)


@pytest.mark.parametrize(("values", "where"), BAD_VALUES)
def test_schema_rejects_bad_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert where in str(err.value)
    assert helm.lint(str(CHART), values, strict=True)["errors"]
