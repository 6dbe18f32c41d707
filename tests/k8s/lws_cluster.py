"""Plays the LeaderWorkerSet controller and the kubelet for the kmock cluster of conftest.py:
the pods of a LeaderWorkerSet's groups, named, labelled and given the environment as the LWS
controller does (leader ``{name}-{group}``, workers ``{name}-{group}-{index}``; labels
``leaderworkerset.sigs.k8s.io/name`` and ``.../worker-index``; ``LWS_LEADER_ADDRESS``,
``LWS_GROUP_SIZE``, ``LWS_WORKER_INDEX`` in every container), owned by the set (really by its
StatefulSets, which the set owns: deleting it deletes them)."""

from __future__ import annotations

import copy
from typing import Any

from control_plane.scheduler.k8s_manifests import LABEL_LWS_NAME, LABEL_LWS_WORKER_INDEX, LABEL_ROLE, LABEL_WORKLOAD
from tests.k8s.conftest import LEADERWORKERSETS, NAMESPACE, PODS, Cluster, Kubelet, ReplicaSetPlayer, running

LWS_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"


class LwsKubelet(Kubelet):
    def lws(self, name: str) -> dict[str, Any]:
        lws = self.c.get(LEADERWORKERSETS, name)
        assert lws is not None, f"no leaderworkerset {name}"
        return lws

    def create_group(self, name: str, group: int = 0, status: dict[str, Any] | None = None) -> list[str]:
        """The pods of one group, leader first; each with ``status`` (Pending by default)."""
        lws = self.lws(name)
        lwt = lws["spec"]["leaderWorkerTemplate"]
        size = int(lwt.get("size", 1))
        leader = f"{name}-{group}"
        names = []
        for index in range(size):
            template = copy.deepcopy(lwt["leaderTemplate"] if index == 0 else lwt["workerTemplate"])
            pod_name = leader if index == 0 else f"{leader}-{index}"
            labels = {
                **template["metadata"]["labels"],
                LABEL_LWS_NAME: name,
                LWS_GROUP_INDEX: str(group),
                LABEL_LWS_WORKER_INDEX: str(index),
            }
            lws_env = [
                {"name": "LWS_LEADER_ADDRESS", "value": f"{leader}.{name}.{NAMESPACE}"},
                {"name": "LWS_GROUP_SIZE", "value": str(size)},
                {"name": "LWS_WORKER_INDEX", "value": str(index)},
            ]
            for c in template["spec"]["containers"]:
                c["env"] = lws_env + list(c.get("env") or [])
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": NAMESPACE,
                    "labels": labels,
                    "annotations": dict(template["metadata"].get("annotations") or {}),
                    "ownerReferences": [
                        {
                            "apiVersion": "leaderworkerset.x-k8s.io/v1",
                            "kind": "LeaderWorkerSet",
                            "name": name,
                            "uid": lws["metadata"]["uid"],
                            "controller": True,
                        }
                    ],
                },
                "spec": template["spec"],
            }
            self.c.core.create_namespaced_pod(NAMESPACE, pod)
            self.set_status(pod_name, status or {"phase": "Pending"})
            names.append(pod_name)
        return names


def group_pods(cluster: Cluster, name: str) -> dict[str, dict[str, Any]]:
    return {
        p: obj
        for p, obj in cluster.objects(PODS).items()
        if obj["metadata"]["labels"].get(LABEL_WORKLOAD) == name and LABEL_LWS_NAME in obj["metadata"]["labels"]
    }


class GroupPlayer(ReplicaSetPlayer):
    """A ``ReplicaSetPlayer`` that also plays the LWS controller: every managed LeaderWorkerSet
    gets ``spec.replicas`` groups of ``size`` pods (groups beyond it deleted), each Running and
    Ready when ``ready`` is set (Pending otherwise)."""

    def __init__(self, cluster: Cluster, **kw: Any) -> None:
        super().__init__(cluster, **kw)
        self.lws_kubelet = LwsKubelet(cluster)

    def step(self) -> None:
        super().step()
        for name, lws in self.c.objects(LEADERWORKERSETS).items():
            want = int((lws.get("spec") or {}).get("replicas", 1))
            role = lws["metadata"]["labels"][LABEL_ROLE]
            status = running(role, ready=True, started=True) if self.ready else {"phase": "Pending"}
            pods = group_pods(self.c, name)
            groups = {int(p["metadata"]["labels"][LWS_GROUP_INDEX]) for p in pods.values()}
            for pod, obj in pods.items():
                if int(obj["metadata"]["labels"][LWS_GROUP_INDEX]) >= want:
                    self.kubelet.delete_pod(pod)
                elif (obj.get("status") or {}).get("phase") != status["phase"]:
                    self.kubelet.set_status(pod, status)
            for group in range(want):
                if group not in groups:
                    self.lws_kubelet.create_group(name, group, status=status)
