"""The deploy files against the code they deploy.

Every `ADVANCED_*` variable that compose or Kubernetes sets must be one the receiving service
reads (a misspelt or retired name is otherwise ignored in silence: the settings allow extra
variables); secret-typed settings go to the Secret, never to the ConfigMap; the dashboard and
the alerts reference only metrics the suite exports, on scrape jobs Prometheus has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from ingress_ws.settings import IngressSettings
from relay_worker.settings import WorkerSettings
from sse_gateway.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
K8S_DIR = REPO / "deploy" / "k8s"

SETTINGS: dict[str, type[BaseSettings]] = {
    "ingress-ws": IngressSettings,
    "sse-gateway": GatewaySettings,
    "relay-worker": WorkerSettings,
}

# The documented metric surface: what the services export on /metrics (CONTRACT.md section 8
# and the per-service instruments), plus what Prometheus adds itself: `up` for every scrape
# target, and the blackbox exporter's `probe_success` for each replica's /readyz. Dashboards
# and alerts may reference nothing else; extend this list when a service adds a metric.
DOCUMENTED_METRICS = {
    "advanced_http_requests_total",
    "advanced_http_request_duration_seconds",
    "advanced_board_events_published_total",
    "advanced_board_event_publish_duration_seconds",
    "advanced_websocket_connections",
    "advanced_sse_connections",
    "advanced_sse_events_sent_total",
    "advanced_worker_events_total",
    "advanced_worker_processing_duration_seconds",
    "advanced_worker_queue_depth",
    "advanced_delivery_latency_seconds",
    "up",
    "probe_success",
}
HISTOGRAMS = {
    "advanced_http_request_duration_seconds",
    "advanced_board_event_publish_duration_seconds",
    "advanced_worker_processing_duration_seconds",
    "advanced_delivery_latency_seconds",
}


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in settings.model_fields}


def secret_env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = settings.model_config.get("env_prefix", "")
    return {
        f"{prefix}{name}".upper()
        for name, field in settings.model_fields.items()
        if SecretStr in (field.annotation, *getattr(field.annotation, "__args__", ()))
    }


READ_BY = {service: env_names(settings) for service, settings in SETTINGS.items()}
READ_BY_ANY = set().union(*READ_BY.values())
SECRETS = set().union(*(secret_env_names(settings) for settings in SETTINGS.values()))


# --- collecting what the deploy files set ---------------------------------------------------

_ADVANCED = re.compile(r"^(ADVANCED_[A-Z0-9_]+)(?:=|$)")
_ENV_FILE_LINE = re.compile(r"^#?\s*(ADVANCED_[A-Z0-9_]+)=", re.MULTILINE)


def k8s_documents() -> Iterator[tuple[Path, Any]]:
    """Every YAML document under deploy/k8s, with kustomize's inline patches parsed too."""
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            yield path, document
            if isinstance(document, dict):
                for patch in document.get("patches", []):
                    if "patch" in patch:
                        yield path, yaml.safe_load(patch["patch"])


def advanced_names(node: Any) -> set[str]:
    """ADVANCED_* names anywhere in a document: keys, env names, `KEY=value` literals."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            found |= advanced_names(key) | advanced_names(value)
    elif isinstance(node, list):
        for item in node:
            found |= advanced_names(item)
    elif isinstance(node, str) and (match := _ADVANCED.match(node)):
        found.add(match.group(1))
    return found


def containers(document: Any) -> Iterator[dict[str, Any]]:
    """Containers of a Deployment or CronJob, whole or as a strategic-merge patch."""
    if not isinstance(document, dict):
        return
    spec = document.get("spec", {})
    if document.get("kind") == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    yield from spec.get("template", {}).get("spec", {}).get("containers", [])


def service_of(container: dict[str, Any]) -> str:
    """The service whose image a container runs (the probe runs in the ingress-ws image)."""
    image = container.get("image", "")
    return image.rsplit("/", 1)[-1].split(":", 1)[0] if image else container["name"]


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())[
        "services"
    ]
    return services


def compose_environment(service: dict[str, Any]) -> set[str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return {item.split("=", 1)[0] for item in environment}
    return set(environment)


def env_example_names(path: Path) -> set[str]:
    return set(_ENV_FILE_LINE.findall(path.read_text()))


# --- environment variables ------------------------------------------------------------------


def test_compose_sets_only_variables_each_service_reads() -> None:
    services = compose_services()
    for name, settings_names in READ_BY.items():
        environment = {
            var for var in compose_environment(services[name]) if var.startswith("ADVANCED_")
        }
        assert "ADVANCED_REALTIME_TOKEN" in environment
        assert environment <= settings_names, (
            f"{name} does not read {sorted(environment - settings_names)}"
        )
    for name, service in services.items():
        if name not in READ_BY:
            assert not any(var.startswith("ADVANCED_") for var in compose_environment(service)), (
                name
            )


def test_compose_runs_the_services_as_production() -> None:
    services = compose_services()
    for name in READ_BY:
        assert services[name]["environment"]["ADVANCED_ENVIRONMENT"] == "production"


def test_kubernetes_sets_only_variables_the_services_read() -> None:
    found: dict[str, set[Path]] = {}
    for path, document in k8s_documents():
        for name in advanced_names(document):
            found.setdefault(name, set()).add(path.relative_to(REPO))
    for path in K8S_DIR.rglob("*.env.example"):
        for name in env_example_names(path):
            found.setdefault(name, set()).add(path.relative_to(REPO))
    assert {"ADVANCED_ENVIRONMENT", "ADVANCED_REALTIME_TOKEN", "ADVANCED_RABBITMQ_URL"} <= set(
        found
    )
    unknown = {
        name: sorted(map(str, paths)) for name, paths in found.items() if name not in READ_BY_ANY
    }
    assert not unknown, f"no service reads {unknown}"


def test_kubernetes_container_env_is_read_by_that_container() -> None:
    checked = set()
    for path, document in k8s_documents():
        for container in containers(document):
            service = service_of(container)
            names = {entry["name"] for entry in container.get("env", [])}
            assert names <= READ_BY[service], (
                f"{path}: {service} does not read {names - READ_BY[service]}"
            )
            checked.add(service)
    assert checked == set(READ_BY)


def test_kubernetes_port_variables_match_the_container_ports() -> None:
    port_variables = {
        "ingress-ws": "ADVANCED_INGRESS_PORT",
        "sse-gateway": "ADVANCED_SSE_PORT",
        "relay-worker": "ADVANCED_WORKER_PORT",
    }
    for _, document in k8s_documents():
        if not isinstance(document, dict) or document.get("kind") != "Deployment":
            continue
        for container in containers(document):
            if "ports" not in container:
                continue  # a patch
            env = {entry["name"]: entry.get("value") for entry in container.get("env", [])}
            http = next(
                port["containerPort"] for port in container["ports"] if port["name"] == "http"
            )
            assert env[port_variables[service_of(container)]] == str(http)


def test_secrets_live_in_the_secret_and_nothing_else_does() -> None:
    example = env_example_names(K8S_DIR / "secrets.env.example")
    assert example <= SECRETS, f"not secrets, move to the ConfigMap: {sorted(example - SECRETS)}"
    assert {"ADVANCED_REALTIME_TOKEN", "ADVANCED_REDIS_URL", "ADVANCED_RABBITMQ_URL"} <= example
    for path, document in k8s_documents():
        if not isinstance(document, dict):
            continue
        config = set()
        for generator in document.get("configMapGenerator", []):
            config |= advanced_names(generator.get("literals", []))
        if document.get("kind") == "ConfigMap":
            config |= advanced_names(document.get("data", {}))
        for container in containers(document):
            config |= {entry["name"] for entry in container.get("env", []) if "value" in entry}
        assert not config & SECRETS, f"{path}: secrets in plain config: {sorted(config & SECRETS)}"


# --- metrics, dashboard and alerts ----------------------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?")
_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_JOB_MATCHER = re.compile(r'\bjob\s*=~?\s*"([^"]+)"')


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects, histogram series folded to their family."""
    for pattern in (_STRING, _MATCHERS, _RANGE, _GROUPING):
        expr = pattern.sub(" ", expr)
    names = set()
    for name, call in _IDENTIFIER.findall(expr):
        if call or name in _PROMQL_KEYWORDS:
            continue
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(family if family in HISTOGRAMS else name)
    return names


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, transport) (rate(advanced_delivery_latency_seconds_bucket"
        '{queue=~"a.b"}[5m]))) > 0.5 or absent(up{job="x"}) or vector(0)'
    )
    assert metric_names(expr) == {"advanced_delivery_latency_seconds", "up"}


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def test_dashboard_queries_only_documented_metrics() -> None:
    dashboards = sorted((COMPOSE_DIR / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    datasources = yaml.safe_load(
        (COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    datasource_uids = {source["uid"] for source in datasources["datasources"]}
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        queried = set()
        for panel in dashboard_panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] in datasource_uids, (
                    f"{path.name}: {panel['title']}"
                )
                queried |= metric_names(target["expr"])
        assert queried, f"{path.name} queries nothing"
        assert queried <= DOCUMENTED_METRICS, (
            f"{path.name}: undocumented {sorted(queried - DOCUMENTED_METRICS)}"
        )


def test_alert_rules_parse_with_the_expected_groups() -> None:
    rules = yaml.safe_load((COMPOSE_DIR / "prometheus" / "alerts.yml").read_text())
    groups = {group["name"]: group["rules"] for group in rules["groups"]}
    assert set(groups) == {"realtime-availability", "realtime-delivery"}
    alerts = {rule["alert"]: rule for group in groups.values() for rule in group}
    assert {
        "RealtimeServiceDown",
        "RealtimeServiceNotReady",
        "RealtimeDeadLettersGrowing",
        "RealtimeRetriesSustained",
        "RealtimeDeliveryLatencyHigh",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        selected = metric_names(rule["expr"])
        assert selected, name
        assert selected <= DOCUMENTED_METRICS, (
            f"{name}: undocumented {sorted(selected - DOCUMENTED_METRICS)}"
        )


def test_alerts_and_dashboard_use_jobs_prometheus_scrapes() -> None:
    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    assert "/etc/prometheus/alerts.yml" in prometheus["rule_files"]
    jobs = {config["job_name"] for config in prometheus["scrape_configs"]}
    expressions = [
        rule["expr"]
        for group in yaml.safe_load((COMPOSE_DIR / "prometheus" / "alerts.yml").read_text())[
            "groups"
        ]
        for rule in group["rules"]
    ]
    for path in (COMPOSE_DIR / "grafana" / "dashboards").glob("*.json"):
        for panel in dashboard_panels(json.loads(path.read_text())["panels"]):
            expressions += [target["expr"] for target in panel.get("targets", [])]
    referenced = {
        job
        for expr in expressions
        for matcher in _JOB_MATCHER.findall(expr)
        for job in matcher.split("|")
    }
    assert referenced
    assert referenced <= jobs, f"no scrape job {sorted(referenced - jobs)}"
