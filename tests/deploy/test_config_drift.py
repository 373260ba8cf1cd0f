"""The deploy files against the code they deploy.

Every `ADVANCED_*` variable that compose or Kubernetes sets must be one the receiving service
reads (a misspelt or retired name is otherwise ignored in silence: the settings allow extra
variables); every variable the contract and the seed name is read by exactly the services
that use it, with the default they give; secret-typed settings go to the Secret, never to the
ConfigMap; the dashboard and the alerts reference only metrics the suite exports, on scrape
jobs Prometheus has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import yaml
from ingress_ws.settings import IngressSettings
from pydantic import SecretStr
from pydantic_settings import BaseSettings
from realtime_runtime.settings import DEFAULT_CSP
from relay_worker.settings import WorkerSettings
from sse_gateway.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
K8S_DIR = REPO / "deploy" / "k8s"
ALERTS = COMPOSE_DIR / "prometheus" / "alerts.yml"
DASHBOARDS = COMPOSE_DIR / "grafana" / "dashboards"

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
    "advanced_worker_partitions_paused",
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


def env_names(settings: type[BaseSettings], *, secrets_only: bool = False) -> set[str]:
    """The variables a settings class reads (`SecretStr` fields only, with `secrets_only`)."""
    prefix = settings.model_config.get("env_prefix", "")
    return {
        f"{prefix}{name}".upper()
        for name, field in settings.model_fields.items()
        if not secrets_only or SecretStr in (field.annotation, *get_args(field.annotation))
    }


READ_BY = {service: env_names(settings) for service, settings in SETTINGS.items()}
RABBITMQ_CLIENTS = {name for name, reads in READ_BY.items() if "ADVANCED_RABBITMQ_URL" in reads}
READ_BY_ANY = set().union(*READ_BY.values())
SECRETS = set().union(*(env_names(settings, secrets_only=True) for settings in SETTINGS.values()))


# --- the contract's and the seed's variables ------------------------------------------------

INGRESS, GATEWAY, WORKER = "ingress-ws", "sse-gateway", "relay-worker"
EVERY = frozenset(SETTINGS)
EDGES = frozenset({INGRESS, GATEWAY})
RABBITMQ = frozenset({INGRESS, WORKER})  # the gateway reads Redis only

# Every variable CONTRACT.md names and the seed's section 6 lists: the services that read it
# (exactly those: a field lives with the services that use it) and its default there.
CONTRACT_VARIABLES: dict[str, tuple[frozenset[str], object]] = {
    # Contract section 1.
    "ADVANCED_INGRESS_PORT": (frozenset({INGRESS}), 8004),
    # The ingress reads it too: the page looks for the gateway there.
    "ADVANCED_SSE_PORT": (EDGES, 8005),
    "ADVANCED_WORKER_PORT": (frozenset({WORKER}), 8006),
    "ADVANCED_HOST": (EVERY, "127.0.0.1"),
    "ADVANCED_REDIS_KEY_PREFIX": (EVERY, "advanced:"),
    # The contract's default, `http://localhost:8005`, is derived: unset, the page uses its
    # own host at ADVANCED_SSE_PORT, which is that URL for a page opened on localhost.
    "ADVANCED_SSE_PUBLIC_URL": (frozenset({INGRESS}), None),
    # Section 2 ("a service refuses to start" with the default token: every service).
    "ADVANCED_REALTIME_TOKEN": (EVERY, "change-me-realtime"),
    "ADVANCED_AUTH_JWT_SECRET": (EDGES, None),
    "ADVANCED_AUTH_JWT_PUBLIC_KEY": (EDGES, None),
    "ADVANCED_ENVIRONMENT": (EVERY, "development"),
    # Sections 3 and 5.
    "ADVANCED_MAX_PAYLOAD_BYTES": (frozenset({INGRESS}), 16_384),
    "ADVANCED_WEBSOCKET_MAX_CONNECTIONS": (frozenset({INGRESS}), 128),
    "ADVANCED_SSE_HEARTBEAT_SECONDS": (frozenset({GATEWAY}), 15),
    "ADVANCED_REPLAY_RETENTION": (frozenset({WORKER}), 10_000),  # the relay trims the streams
    "ADVANCED_ALLOWED_ORIGINS": (
        EDGES,
        ["http://localhost:3000", "http://127.0.0.1:3000", "http://localhost:5173"],
    ),
    # Section 6 and the seed's 6.1: the retry ladder is the worker's.
    "ADVANCED_RABBITMQ_RETRY_DELAY_MS": (frozenset({WORKER}), 5000),
    "ADVANCED_RABBITMQ_MAX_RETRIES": (frozenset({WORKER}), 5),
    # Section 8 and the seed's 6.2.
    "ADVANCED_TELEMETRY_ENABLED": (EVERY, True),
    "ADVANCED_METRICS_PATH": (EVERY, "/metrics"),
    "ADVANCED_OTEL_EXPORTER_OTLP_ENDPOINT": (EVERY, None),
    "ADVANCED_OTEL_EXPORTER_OTLP_PROTOCOL": (EVERY, "http/protobuf"),
    "ADVANCED_OTEL_EXPORTER_OTLP_HEADERS": (EVERY, None),
    "ADVANCED_RATE_LIMIT_DEFAULT": (EDGES, "120/minute"),
    "ADVANCED_ACTIVITY_STREAM_RATE_LIMIT": (frozenset({GATEWAY}), "30/minute"),
    # Sections 9, 11, 12 and 13.
    "ADVANCED_RABBITMQ_URL": (RABBITMQ, "amqp://guest:guest@localhost:5672/"),
    "ADVANCED_RABBITMQ_QUEUE_TYPE": (RABBITMQ, "classic"),
    "ADVANCED_REPLAY_RETENTION_SECONDS": (frozenset({WORKER}), 0),
    "ADVANCED_PRESENCE_TTL_SECONDS": (frozenset({INGRESS}), 30),
    "ADVANCED_AUTH_REFRESH_WARNING_SECONDS": (frozenset({INGRESS}), 30),
    # The seed's 6.1 beside them.
    "ADVANCED_EVENT_TRANSPORT": (EVERY, "rabbitmq"),
    "ADVANCED_BOARD_CHANNEL": (EVERY, "advanced:board"),
    "ADVANCED_ACTIVITY_CHANNEL": (EVERY, "advanced:activity"),
    "ADVANCED_REDIS_URL": (EVERY, "redis://localhost:6379/2"),
    "ADVANCED_REDIS_MODE": (EVERY, "standalone"),
    "ADVANCED_REDIS_MIN_REPLICAS": (frozenset({WORKER}), 0),
    "ADVANCED_REDIS_IDEMPOTENCY_TTL_SECONDS": (frozenset({WORKER}), 300),
    "ADVANCED_RABBITMQ_EXCHANGE": (RABBITMQ, "advanced.board.events"),
    "ADVANCED_RABBITMQ_QUEUE": (RABBITMQ, "advanced.board.events"),
    "ADVANCED_RABBITMQ_RETRY_QUEUE": (RABBITMQ, "advanced.board.events.retry"),
    "ADVANCED_RABBITMQ_DLQ_QUEUE": (RABBITMQ, "advanced.board.events.dlq"),
    # The seed's 6.2 beside them (its CSP default is "strict, see the Settings class").
    "ADVANCED_CONTENT_SECURITY_POLICY": (EVERY, DEFAULT_CSP),
    "ADVANCED_STRICT_TRANSPORT_SECURITY": (EVERY, "max-age=63072000; includeSubDomains; preload"),
}
# Contract variables no service implements yet: move each into the table above with its
# readers when one does.
CONTRACT_VARIABLES_NOT_YET_READ: set[str] = set()


def default_of(settings: type[BaseSettings], variable: str) -> object:
    field = settings.model_fields[variable.removeprefix("ADVANCED_").lower()]
    default = field.get_default(call_default_factory=True)
    return default.get_secret_value() if isinstance(default, SecretStr) else default


def test_every_contract_variable_is_read_by_the_services_that_use_it_with_its_default() -> None:
    for variable, (readers, default) in CONTRACT_VARIABLES.items():
        read_by = {service for service, reads in READ_BY.items() if variable in reads}
        assert read_by == readers, f"{variable} is read by {sorted(read_by)}, not {sorted(readers)}"
        for service in readers:
            assert default_of(SETTINGS[service], variable) == default, (variable, service)
    assert not CONTRACT_VARIABLES_NOT_YET_READ & READ_BY_ANY, "move it to CONTRACT_VARIABLES"


# --- what the deploy files set --------------------------------------------------------------

_ADVANCED = re.compile(r"^(ADVANCED_[A-Z0-9_]+)(?:=|$)")
_ENV_FILE_LINE = re.compile(r"^#?\s*(ADVANCED_[A-Z0-9_]+)=", re.MULTILINE)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_documents() -> Iterator[tuple[Path, Any]]:
    """Every YAML document under deploy/k8s, kustomize's inline patches included."""
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
    image: str = container.get("image", "")
    name: str = container["name"]
    return image.rsplit("/", 1)[-1].split(":", 1)[0] if image else name


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(COMPOSE_DIR / "compose.yaml")["services"]
    return services


def compose_environment(service: dict[str, Any]) -> set[str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return {item.split("=", 1)[0] for item in environment}
    return set(environment)


def env_example_names(path: Path) -> set[str]:
    """Variables an example env file sets or documents (commented-out optional ones too)."""
    return set(_ENV_FILE_LINE.findall(path.read_text()))


# --- environment variables ------------------------------------------------------------------


def test_compose_sets_only_variables_each_service_reads() -> None:
    services = compose_services()
    assert set(READ_BY) <= set(services)
    for name, service in services.items():
        environment = {var for var in compose_environment(service) if var.startswith("ADVANCED_")}
        if name not in READ_BY:
            assert not environment, f"{name} is not a suite service: {sorted(environment)}"
            continue
        assert "ADVANCED_REALTIME_TOKEN" in environment
        assert environment <= READ_BY[name], f"{name} ignores {sorted(environment - READ_BY[name])}"


def test_the_rabbitmq_cluster_variant_sets_only_variables_each_service_reads() -> None:
    """compose.rabbitmq-cluster.yaml, merged over compose.yaml: every suite service that uses
    RabbitMQ gets the three nodes and quorum queues, in variables it reads."""
    cluster: dict[str, Any] = load_yaml(COMPOSE_DIR / "compose.rabbitmq-cluster.yaml")["services"]
    assert not set(cluster) & (set(READ_BY) - RABBITMQ_CLIENTS)  # the gateway reads no RabbitMQ
    for name in RABBITMQ_CLIENTS:
        reads = READ_BY[name]
        environment = compose_environment(cluster[name])
        assert environment <= reads, f"{name} ignores {sorted(environment - reads)}"
        env = cluster[name]["environment"]
        assert env["ADVANCED_RABBITMQ_QUEUE_TYPE"] == "quorum", name
        hosts = {
            url.split("@", 1)[1].split(":", 1)[0] for url in env["ADVANCED_RABBITMQ_URL"].split(",")
        }
        assert hosts == {"rabbitmq", "rabbitmq-2", "rabbitmq-3"}, (name, hosts)


def test_compose_runs_the_services_as_production() -> None:
    services = compose_services()
    for name in READ_BY:
        assert services[name]["environment"]["ADVANCED_ENVIRONMENT"] == "production"


def test_kubernetes_sets_only_variables_the_services_read() -> None:
    found: dict[str, set[str]] = {}
    for path, document in k8s_documents():
        for name in advanced_names(document):
            found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    for path in K8S_DIR.rglob("*.env.example"):
        for name in env_example_names(path):
            found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert {"ADVANCED_ENVIRONMENT", "ADVANCED_REALTIME_TOKEN", "ADVANCED_RABBITMQ_URL"} <= set(
        found
    )
    unknown = {name: sorted(paths) for name, paths in found.items() if name not in READ_BY_ANY}
    assert not unknown, f"no service reads {unknown}"


def test_kubernetes_container_env_is_read_by_that_container() -> None:
    checked = set()
    for path, document in k8s_documents():
        for container in containers(document):
            service = service_of(container)
            names = {entry["name"] for entry in container.get("env", [])}
            assert names <= READ_BY[service], (
                f"{path}: {service} ignores {names - READ_BY[service]}"
            )
            checked.add(service)
    assert checked == set(READ_BY)


def test_kubernetes_port_variables_match_the_container_ports() -> None:
    port_variables = {
        "ingress-ws": "ADVANCED_INGRESS_PORT",
        "sse-gateway": "ADVANCED_SSE_PORT",
        "relay-worker": "ADVANCED_WORKER_PORT",
    }
    checked = set()
    for _, document in k8s_documents():
        if not isinstance(document, dict) or document.get("kind") != "Deployment":
            continue
        for container in containers(document):
            if "ports" not in container:
                continue  # a patch
            env = {entry["name"]: entry.get("value") for entry in container.get("env", [])}
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            service = service_of(container)
            assert env[port_variables[service]] == str(ports["http"]), service
            checked.add(service)
    assert checked == set(port_variables)


def test_secrets_live_in_the_secret_and_nothing_else_does() -> None:
    example = env_example_names(K8S_DIR / "secrets.env.example")
    assert {"ADVANCED_REALTIME_TOKEN", "ADVANCED_REDIS_URL", "ADVANCED_RABBITMQ_URL"} <= example
    assert example <= SECRETS, f"not secrets, move to the ConfigMap: {sorted(example - SECRETS)}"
    for path, document in k8s_documents():
        if not isinstance(document, dict):
            continue
        plain: set[str] = set()
        for generator in document.get("configMapGenerator", []):
            plain |= advanced_names(generator.get("literals", []))
        if document.get("kind") == "ConfigMap":
            plain |= advanced_names(document.get("data", {}))
        for container in containers(document):
            plain |= {entry["name"] for entry in container.get("env", []) if "value" in entry}
        assert not plain & SECRETS, f"{path}: secrets in plain config: {sorted(plain & SECRETS)}"


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


def dashboard_expressions(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of a dashboard, rows' nested panels included."""
    pending = list(json.loads(path.read_text())["panels"])
    while pending:
        panel = pending.pop()
        pending.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield panel["title"], target


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, transport) ("
        'rate(advanced_delivery_latency_seconds_bucket{queue=~"a.b"}[5m])'
        ')) > 0.5 or absent(up{job="x"}) or vector(0)'
    )
    assert metric_names(expr) == {"advanced_delivery_latency_seconds", "up"}


def test_dashboard_queries_only_documented_metrics() -> None:
    dashboards = sorted(DASHBOARDS.glob("*.json"))
    assert dashboards
    datasources = load_yaml(COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yml")
    datasource_uids = {source["uid"] for source in datasources["datasources"]}
    for path in dashboards:
        queried = set()
        for title, target in dashboard_expressions(path):
            assert target["datasource"]["uid"] in datasource_uids, title
            queried |= metric_names(target["expr"])
        assert queried, f"{path.name} queries nothing"
        undocumented = queried - DOCUMENTED_METRICS
        assert not undocumented, f"{path.name}: undocumented metrics {sorted(undocumented)}"


def test_alert_rules_parse_with_the_expected_groups() -> None:
    groups = {group["name"] for group in load_yaml(ALERTS)["groups"]}
    assert groups == {"realtime-availability", "realtime-delivery"}
    alerts = {rule["alert"]: rule for rule in alert_rules()}
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
        undocumented = selected - DOCUMENTED_METRICS
        assert not undocumented, f"{name}: undocumented metrics {sorted(undocumented)}"


def test_alerts_and_dashboard_use_jobs_prometheus_scrapes() -> None:
    prometheus = load_yaml(COMPOSE_DIR / "prometheus" / "prometheus.yml")
    assert f"/etc/prometheus/{ALERTS.name}" in prometheus["rule_files"]
    jobs = {config["job_name"] for config in prometheus["scrape_configs"]}
    expressions = [rule["expr"] for rule in alert_rules()]
    for path in DASHBOARDS.glob("*.json"):
        expressions += [target["expr"] for _, target in dashboard_expressions(path)]
    referenced = set()
    for expr in expressions:
        for alternatives in _JOB_MATCHER.findall(expr):
            referenced |= set(alternatives.split("|"))
    assert referenced
    assert referenced <= jobs, f"no scrape job {sorted(referenced - jobs)}"
