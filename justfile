# The realtime collaboration suite. `just` lists the recipes.
set dotenv-load := false
set shell := ["bash", "-euo", "pipefail", "-c"]

uv := "uv"

default:
    @just --list

# Install every workspace member and the dev tools into .venv (uv, one lock).
[group('setup')]
setup:
    {{uv}} sync --all-packages --frozen

# The services alone, for running them: no test or lint tools (--no-dev), and nothing that an
# earlier `setup` installed is removed (--inexact), so `just test` afterwards installs nothing.
[private]
setup-runtime:
    {{uv}} sync --all-packages --frozen --no-dev --inexact

# Run the suite: the three services against RabbitMQ and Redis when both answer, else all in one process on the in-memory transport.
[group('run')]
dev: setup-runtime
    {{uv}} run --no-sync python scripts/dev.py

# Run the whole suite in one process on the in-memory transport (no brokers).
[group('run')]
dev-memory: setup-runtime
    {{uv}} run --no-sync realtime-dev

# Every test: unit, adapter contracts, end to end, fault injection and the deploy checks.
[group('test')]
test: setup
    {{uv}} run pytest

# Unit and adapter contract tests only (fast).
[group('test')]
unit: setup
    {{uv}} run pytest libs services tools

# End-to-end tests: the real processes against real RabbitMQ and Redis (testcontainers when a Docker engine answers).
[group('test')]
e2e: setup
    {{uv}} run pytest tests/e2e -m e2e

# The end-to-end tests on brokers that testcontainers starts, from the images in ADVANCED_TEST_RABBITMQ_IMAGE / ADVANCED_TEST_REDIS_IMAGE (CI: its stand-ins); fails if no engine answers at DOCKER_HOST.
[group('test')]
e2e-testcontainers: setup
    # No Ryuk (its image comes from a registry); docker_host mode, since this may itself run
    # in a container whose engine publishes ports on localhost.
    ADVANCED_TEST_BROKERS=testcontainers TESTCONTAINERS_RYUK_DISABLED=true \
    TESTCONTAINERS_CONNECTION_MODE=docker_host {{uv}} run pytest tests/e2e -m e2e

# Fault-injection tests: kill -9, Redis restarts, cut RabbitMQ connections, poison messages.
[group('test')]
chaos: setup
    {{uv}} run pytest tests/chaos -m chaos

# The playground page in headless Chromium (Debian's: apt-get install -y chromium chromium-driver).
[group('test')]
browser: setup
    {{uv}} run pytest tests/browser -m browser

# Edge hardening: auth, origins, limits, headers, fuzzing and raw-socket abuse (docs/security.md).
[group('test')]
security: setup
    {{uv}} run pytest tests/security libs/runtime/tests/test_auth.py

# ruff (format and lint), mypy --strict on the sources, and the layer rules (import-linter).
[group('check')]
lint: setup
    {{uv}} run ruff format --check .
    {{uv}} run ruff check .
    {{uv}} run mypy libs/envelope/src libs/runtime/src services/ingress-ws/src services/sse-gateway/src services/relay-worker/src tools/dev-suite/src tools/probe/src
    {{uv}} run lint-imports

# Copy the client module (clients/js) into the ingress's static files, which serve and ship it.
[group('check')]
client-copy:
    cp clients/js/realtime.js clients/js/transports.js clients/js/transport-base.js clients/js/event-source.js services/ingress-ws/src/ingress_ws/static/

# Rewrite the envelope's JSON Schema from the models.
[group('check')]
schema: setup
    {{uv}} run python -m envelope.schema libs/envelope/schema

# Send a WebSocket event and wait for it on SSE; prints the latency.
[group('run')]
probe *args: setup-runtime
    {{uv}} run --no-sync realtime-probe {{args}}

compose_cluster := "-f deploy/compose/compose.yaml -f deploy/compose/compose.rabbitmq-cluster.yaml"
compose_redis_cluster := "-f deploy/compose/compose.yaml -f deploy/compose/compose.redis-cluster.yaml"

# deploy/compose/.env with a fresh token, unless there is one.
[private]
compose-env:
    #!/usr/bin/env bash
    set -euo pipefail
    if [[ ! -f deploy/compose/.env ]]; then
        token=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
        sed "s/^ADVANCED_REALTIME_TOKEN=.*/ADVANCED_REALTIME_TOKEN=${token}/" deploy/compose/.env.example > deploy/compose/.env
        echo "wrote deploy/compose/.env with a new ADVANCED_REALTIME_TOKEN"
    fi

# Start the whole suite in containers (writes deploy/compose/.env with a fresh token on first use).
[group('deploy')]
up: compose-env
    docker compose -f deploy/compose/compose.yaml up --build --detach --wait

# Stop the containers (volumes kept).
[group('deploy')]
down:
    docker compose -f deploy/compose/compose.yaml down

# The same on a three-node RabbitMQ cluster with quorum queues (deploy/compose/compose.rabbitmq-cluster.yaml).
[group('deploy')]
up-cluster: compose-env
    docker compose {{compose_cluster}} up --build --detach --wait

# Stop the cluster variant's containers (volumes kept).
[group('deploy')]
down-cluster:
    docker compose {{compose_cluster}} down

# The same on a six-node Redis Cluster, three masters with a replica each (deploy/compose/compose.redis-cluster.yaml).
[group('deploy')]
up-redis-cluster: compose-env
    docker compose {{compose_redis_cluster}} up --build --detach --wait

# Stop the Redis Cluster variant's containers (volumes kept).
[group('deploy')]
down-redis-cluster:
    docker compose {{compose_redis_cluster}} down

# The images built and the whole suite under compose, single-node, then on three RabbitMQ nodes, then on a six-node Redis Cluster, on a private engine (CI; about 14-17 min, root): scripts/containers/ci.sh.
[group('deploy')]
containers: setup
    bash scripts/containers/ci.sh

# Offline checks: hadolint, compose config, kustomize + kubernetes-validate, uv lock --check.
[group('check')]
lint-deploy:
    bash scripts/check-deploy.sh

# The suite against the textbook baseline (15-20 min): bench/results/<date>.{json,md,png}.
[group('bench')]
bench *args: setup
    {{uv}} run --group bench python -m bench --profile {{args}}

# Latency and max rate on a private three-node RabbitMQ cluster with quorum queues beside the
# single shared node (classic queues): bench/results/<date>-quorum.{json,md,png}.
[group('bench')]
bench-quorum *args: setup
    {{uv}} run --group bench python -m bench --targets suite,suite-quorum --scenarios latency,max_rate --name "$(date +%F)-quorum" {{args}}

# A smoke run of every scenario (about 4 min), into bench/results/tmp/.
[group('bench')]
bench-quick *args: setup
    {{uv}} run --group bench python -m bench --quick --out bench/results/tmp {{args}}
