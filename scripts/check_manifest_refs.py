"""Dangling references in rendered Kubernetes manifests, which schema validation cannot see.

Usage: check_manifest_refs.py RENDERED.yaml...   (the output of `kubectl kustomize`)

Checks that every ConfigMap and Secret a pod reads, every autoscaler target, every Ingress
backend and every KEDA ScaledObject's target, TriggerAuthentication and Secret key exists in the
same render; and that no Deployment is scaled by both an HPA and a ScaledObject (they would fight).
A RabbitmqCluster (RabbitMQ Cluster Operator) must have an odd number of replicas, at least 3, a
PodDisruptionBudget letting one of its pods go at a time, and the suite's ConfigMap on quorum
queues. KEDA's and the operator's resources have no schema in kubernetes-validate, so these
checks are what stands for one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]


def _names(manifests: list[Manifest], kind: str) -> set[str]:
    return {m["metadata"]["name"] for m in manifests if m["kind"] == kind}


def _pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for m in manifests:
        if m["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield m["metadata"]["name"], m["spec"]["template"]["spec"]
        elif m["kind"] == "CronJob":
            yield m["metadata"]["name"], m["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def dangling_references(manifests: list[Manifest]) -> list[str]:
    problems: list[str] = []
    config_maps = _names(manifests, "ConfigMap")
    secrets = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Secret"}
    deployments = _names(manifests, "Deployment")
    trigger_auths = {
        m["metadata"]["name"]: m for m in manifests if m["kind"] == "TriggerAuthentication"
    }

    for owner, pod in _pod_specs(manifests):
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            for source in container.get("envFrom", []):
                if (ref := source.get("configMapRef")) and ref["name"] not in config_maps:
                    problems.append(f"{owner}: ConfigMap {ref['name']} is not in the render")
                if (ref := source.get("secretRef")) and ref["name"] not in secrets:
                    problems.append(f"{owner}: Secret {ref['name']} is not in the render")

    services = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Service"}
    for ingress in (m for m in manifests if m["kind"] == "Ingress"):
        ingress_name = ingress["metadata"]["name"]
        for rule in ingress["spec"].get("rules", []):
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = services.get(backend["name"])
                if service is None:
                    problems.append(f"Ingress {ingress_name}: no Service {backend['name']}")
                    continue
                port = backend["port"]
                known = {
                    key for p in service["spec"]["ports"] for key in (p.get("name"), p["port"])
                }
                if port.get("name", port.get("number")) not in known:
                    problems.append(f"Ingress {ingress_name}: {backend['name']} has no port {port}")

    hpas = [m for m in manifests if m["kind"] == "HorizontalPodAutoscaler"]
    hpa_targets = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas}
    for hpa in hpas:
        if hpa["spec"]["scaleTargetRef"]["name"] not in deployments:
            problems.append(f"HPA {hpa['metadata']['name']}: no Deployment to scale")

    for scaled in (m for m in manifests if m["kind"] == "ScaledObject"):
        name = scaled["metadata"]["name"]
        target = scaled["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            problems.append(f"ScaledObject {name}: no Deployment {target}")
        if target in hpa_targets:
            problems.append(f"ScaledObject {name}: Deployment {target} also has an HPA")
        for trigger in scaled["spec"]["triggers"]:
            auth_name = trigger.get("authenticationRef", {}).get("name")
            if auth_name is None:
                continue
            auth = trigger_auths.get(auth_name)
            if auth is None:
                problems.append(f"ScaledObject {name}: no TriggerAuthentication {auth_name}")
                continue
            for ref in auth["spec"].get("secretTargetRef", []):
                secret = secrets.get(ref["name"])
                data = {**(secret or {}).get("data", {}), **(secret or {}).get("stringData", {})}
                if ref["key"] not in data:
                    problems.append(f"{auth_name}: Secret {ref['name']} has no key {ref['key']}")
    problems += _rabbitmq_cluster_problems(manifests)
    return problems


def _rabbitmq_cluster_problems(manifests: list[Manifest]) -> list[str]:
    problems: list[str] = []
    budgets = [m for m in manifests if m["kind"] == "PodDisruptionBudget"]
    queue_types = {
        m["data"].get("ADVANCED_RABBITMQ_QUEUE_TYPE")
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("realtime-config")
    }
    for cluster in (m for m in manifests if m["kind"] == "RabbitmqCluster"):
        name = cluster["metadata"]["name"]
        replicas = cluster["spec"].get("replicas", 1)
        if replicas < 3 or replicas % 2 == 0:
            problems.append(f"RabbitmqCluster {name}: {replicas} replicas, want an odd number >= 3")
        # The operator labels the pods app.kubernetes.io/name=<the cluster's name>.
        selecting = [
            b
            for b in budgets
            if b["spec"]["selector"].get("matchLabels") == {"app.kubernetes.io/name": name}
        ]
        if [b["spec"].get("maxUnavailable") for b in selecting] != [1]:
            problems.append(f"RabbitmqCluster {name}: want one PDB of maxUnavailable 1 on its pods")
        if queue_types != {"quorum"}:
            problems.append(f"RabbitmqCluster {name}: realtime-config has queue type {queue_types}")
    return problems


def main(paths: list[str]) -> int:
    failed = False
    for path in paths:
        manifests = [m for m in yaml.safe_load_all(Path(path).read_text()) if m]
        for problem in dangling_references(manifests):
            print(f"{path}: {problem}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
