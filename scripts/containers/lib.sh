# Shared by the scripts in scripts/containers (sourced, not run).

# The engine CI starts (scripts/containers/engine.sh) listens here, never on /var/run/docker.sock,
# so the rest of CI does not see it.
REALTIME_CI_DOCKER_HOST=${REALTIME_CI_DOCKER_HOST:-unix:///run/ci-docker.sock}

log() { printf '[%s %s] %s\n' "${LOG_NAME:-containers}" "$(date -u +%H:%M:%S)" "$*"; }
die() { printf '%s: %s\n' "${LOG_NAME:-containers}" "$*" >&2; exit 1; }
timed() {  # label, command...: runs it and prints how long it took
  local label=$1 start=$SECONDS
  shift
  log "$label ..."
  "$@"
  log "$label: done in $((SECONDS - start)) s"
}

# Debian's docker.io client (20.10) builds with its built-in BuildKit; a newer client on PATH
# wants the buildx plugin, which Debian does not ship. Prefer Debian's when it is there.
docker() {
  if [[ -x /usr/bin/docker ]]; then /usr/bin/docker "$@"; else command docker "$@"; fi
}
