"""The deploy files give browsers the session route, and the brokers and pods the protections
the docs promise: routes on every Ingress, egress policies, Redis with a password and fsync."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"
SERVICES = {"ingress-ws", "sse-gateway", "relay-worker"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def ingress_routes() -> dict[str, tuple[str, str]]:
    """path -> (pathType, backend Service) over every Ingress of the base."""
    routes: dict[str, tuple[str, str]] = {}
    for path in sorted((K8S / "base").glob("*.yaml")):
        for document in documents(path):
            if document.get("kind") != "Ingress":
                continue
            for rule in document["spec"]["rules"]:
                for entry in rule["http"]["paths"]:
                    service = entry["backend"]["service"]["name"]
                    routes[entry["path"]] = (entry["pathType"], service)
    return routes


def test_the_ingresses_route_the_session_the_sockets_and_the_streams() -> None:
    routes = ingress_routes()
    # Without /session a browser cannot get the cookie and falls back to ?token= in URLs.
    assert routes["/session"] == ("Exact", "ingress-ws")
    assert routes["/ws/"] == ("Prefix", "ingress-ws")
    assert routes["/sse/"] == ("Prefix", "sse-gateway")


def test_every_overlay_moves_every_ingress_to_one_public_host_that_the_edges_allow() -> None:
    for overlay in ("dev", "prod"):
        kustomization = yaml.safe_load(
            (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
        )
        host_patch = next(
            yaml.safe_load(p["patch"])
            for p in kustomization["patches"]
            if p.get("target", {}).get("kind") == "Ingress"
        )
        public_host = next(op["value"] for op in host_patch if op["path"] == "/spec/rules/0/host")
        literals = [
            literal
            for generator in kustomization["configMapGenerator"]
            for literal in generator["literals"]
        ]
        hosts = next(v for v in literals if v.startswith("ADVANCED_ALLOWED_HOSTS=")).split("=", 1)[
            1
        ]
        # The public host, and the Service names the synthetic probe connects to.
        assert {public_host, "ingress-ws", "sse-gateway"} <= set(hosts.split(","))


def egress_ports(policy: dict[str, Any]) -> set[tuple[int, str]]:
    return {
        (port["port"], port.get("protocol", "TCP"))
        for rule in policy["spec"].get("egress", [])
        for port in rule.get("ports", [])
    }


def test_the_services_and_the_probe_may_reach_only_what_they_use() -> None:
    policies = {d["metadata"]["name"]: d for d in documents(K8S / "base" / "network-policies.yaml")}
    services = policies["services-egress"]
    selected = set(services["spec"]["podSelector"]["matchExpressions"][0]["values"])
    assert selected == SERVICES and services["spec"]["policyTypes"] == ["Egress"]
    assert {(53, "UDP"), (53, "TCP"), (6379, "TCP"), (5672, "TCP"), (5671, "TCP")} <= egress_ports(
        services
    )
    assert {(4317, "TCP"), (4318, "TCP")} <= egress_ports(services)  # the OTLP collector
    probe = policies["probe-egress"]
    assert probe["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "realtime-probe"
    }
    assert egress_ports(probe) == {(53, "UDP"), (53, "TCP"), (8004, "TCP"), (8005, "TCP")}


def test_compose_redis_has_a_password_and_fsyncs_every_write() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync always" in command
    assert "--requirepass" in command and redis["environment"]["REDIS_PASSWORD"]
    assert redis["environment"]["REDISCLI_AUTH"] == redis["environment"]["REDIS_PASSWORD"]
    for name in SERVICES:
        url = compose["services"][name]["environment"]["ADVANCED_REDIS_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD"), url  # the password rides in the URL


def test_compose_redis_cluster_nodes_persist_authenticate_and_keep_their_addresses() -> None:
    """Six nodes, each with the single node's persistence and password (and `masterauth`, or
    a replica cannot follow its master), announcing the fixed address it has on the network."""
    cluster = yaml.safe_load((COMPOSE.parent / "compose.redis-cluster.yaml").read_text())
    nodes = ["redis", *(f"redis-{n}" for n in range(2, 7))]
    addresses = set()
    for name in nodes:
        node = cluster["services"][name]
        command = " ".join(node["command"])
        for flag in ("--cluster-enabled yes", "--appendonly yes", "--appendfsync always"):
            assert flag in command, (name, flag)
        assert "--requirepass" in command and "--masterauth" in command, name
        assert '--cluster-announce-ip "$$REDIS_NODE_IP"' in command, name
        address = node["networks"]["default"]["ipv4_address"]
        assert node["environment"]["REDIS_NODE_IP"] == address, name
        volume = node["volumes"][0].split(":", 1)[0]
        assert volume in cluster["volumes"], (name, volume)
        addresses.add(address)
    assert len(addresses) == len(nodes)
    create = " ".join(cluster["services"]["redis-cluster-create"]["command"])
    assert "--cluster create" in create and "--cluster-replicas 1" in create
    assert set(cluster["services"]["redis-cluster-create"]["depends_on"]) == set(nodes)
    for name in SERVICES:
        waits = cluster["services"][name]["depends_on"]["redis-cluster-create"]
        assert waits == {"condition": "service_completed_successfully"}, name
