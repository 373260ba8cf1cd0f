"""CI's compose override (deploy/compose/compose.ci.yaml) swaps image names and nothing else,
so what `just containers` starts is the compose file a user starts, on other base images; and
the Dockerfiles build on the registry images unless told otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "deploy/compose/compose.yaml").read_text())
OVERRIDE = yaml.safe_load((REPO / "deploy/compose/compose.ci.yaml").read_text())


def test_the_ci_override_sets_image_names_only() -> None:
    assert set(OVERRIDE) == {"services"}, set(OVERRIDE)
    for name, service in OVERRIDE["services"].items():
        assert name in COMPOSE["services"], f"compose.ci.yaml: no service {name!r} to override"
        assert set(service) == {"image"}, f"compose.ci.yaml: {name} sets {sorted(service)}"
        assert service["image"].startswith("localhost/realtime-ci/"), service["image"]
    # Every registry image has its stand-in; the services' own images are built, not swapped.
    pulled = {n for n, s in COMPOSE["services"].items() if "build" not in s}
    assert set(OVERRIDE["services"]) == pulled


def test_the_dockerfiles_default_to_the_registry_images() -> None:
    for dockerfile in sorted(REPO.glob("services/*/Dockerfile")):
        text = dockerfile.read_text()
        assert "ARG PYTHON_IMAGE=python:3.12-slim\n" in text, dockerfile
        assert "ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9\n" in text, dockerfile
        # A `# syntax=` line makes BuildKit fetch a frontend image from a registry.
        assert not text.startswith("# syntax="), dockerfile
        # buildah refuses relative bind-mount targets.
        targets = re.findall(r"--mount=type=bind,[^ ]*target=([^ ,]+)", text)
        assert targets and all(t.startswith("/") for t in targets), (dockerfile, targets)


CLUSTER = yaml.safe_load((REPO / "deploy/compose/compose.rabbitmq-cluster.yaml").read_text())
CLUSTER_OVERRIDE = yaml.safe_load(
    (REPO / "deploy/compose/compose.rabbitmq-cluster.ci.yaml").read_text()
)


def test_the_cluster_ci_override_sets_image_names_of_the_clusters_new_containers_only() -> None:
    assert set(CLUSTER_OVERRIDE) == {"services"}, set(CLUSTER_OVERRIDE)
    for name, service in CLUSTER_OVERRIDE["services"].items():
        assert set(service) == {"image"}, f"compose.rabbitmq-cluster.ci.yaml: {name} sets {service}"
        assert service["image"] == OVERRIDE["services"]["rabbitmq"]["image"], (name, service)
    # Every service the cluster file adds with a registry image, and none of compose.yaml's
    # (compose.ci.yaml already swaps those).
    added = {n for n, s in CLUSTER["services"].items() if "image" in s}
    assert set(CLUSTER_OVERRIDE["services"]) == added
    assert not added & set(COMPOSE["services"])
    assert {CLUSTER["services"][n]["image"] for n in added} == {
        COMPOSE["services"]["rabbitmq"]["image"]
    }


REDIS_CLUSTER = yaml.safe_load((REPO / "deploy/compose/compose.redis-cluster.yaml").read_text())
REDIS_CLUSTER_OVERRIDE = yaml.safe_load(
    (REPO / "deploy/compose/compose.redis-cluster.ci.yaml").read_text()
)


def test_the_redis_cluster_ci_override_sets_image_names_of_its_new_containers_only() -> None:
    assert set(REDIS_CLUSTER_OVERRIDE) == {"services"}, set(REDIS_CLUSTER_OVERRIDE)
    for name, service in REDIS_CLUSTER_OVERRIDE["services"].items():
        assert set(service) == {"image"}, f"compose.redis-cluster.ci.yaml: {name} sets {service}"
        assert service["image"] == OVERRIDE["services"]["redis"]["image"], (name, service)
    added = {n for n, s in REDIS_CLUSTER["services"].items() if "image" in s}
    assert set(REDIS_CLUSTER_OVERRIDE["services"]) == added
    assert not added & set(COMPOSE["services"])
    assert {REDIS_CLUSTER["services"][n]["image"] for n in added} == {
        COMPOSE["services"]["redis"]["image"]
    }
