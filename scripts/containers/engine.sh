#!/usr/bin/env bash
# CI's container engine: Debian's dockerd on a socket and data root of its own, so the rest of
# CI (and `tests/support/brokers.py`, which switches to testcontainers when `docker info`
# answers) never sees it in /var/run/docker.sock or DOCKER_HOST.
#
#   scripts/containers/engine.sh start   # installs docker.io if needed; starts dockerd unless one answers
#   scripts/containers/engine.sh stop    # stops it and removes its data, only if `start` started it
#   scripts/containers/engine.sh started # exit 0 when the running engine is one `start` started
#
# Use it with DOCKER_HOST=unix:///run/ci-docker.sock (REALTIME_CI_DOCKER_HOST overrides).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOG_NAME=engine
# shellcheck source=scripts/containers/lib.sh
source "$root/scripts/containers/lib.sh"

socket=${REALTIME_CI_DOCKER_HOST#unix://}
name=$(basename "$socket" .sock)  # ci-docker: /var/lib/ci-docker, /run/ci-docker, ...
data_root=/var/lib/$name
exec_root=/run/$name
pidfile=/run/$name.pid
marker=/run/$name.started-by-ci  # present only while an engine that `start` started runs
engine_log=/run/$name.log
# One engine per machine: dockerd owns the docker0 bridge and the DOCKER iptables chains
# (a second one with --bridge=none deletes docker0; with --iptables=false its containers have
# no embedded DNS, so compose's service names do not resolve).

answers() { DOCKER_HOST=$REALTIME_CI_DOCKER_HOST docker info >/dev/null 2>&1; }

start() {
  if answers; then
    log "an engine already answers on $REALTIME_CI_DOCKER_HOST: using it (and leaving it running)"
    return
  fi
  if ! command -v dockerd >/dev/null || [[ ! -x /usr/bin/docker ]]; then
    timed "apt-get install docker.io" bash -c \
      'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null'
  fi
  log "starting dockerd on $REALTIME_CI_DOCKER_HOST (data root $data_root, log $engine_log)"
  touch "$marker"
  setsid dockerd -H "$REALTIME_CI_DOCKER_HOST" --data-root "$data_root" --exec-root "$exec_root" \
    --pidfile "$pidfile" >"$engine_log" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    answers && { log "dockerd answers"; return; }
    kill -0 $! 2>/dev/null || { tail -20 "$engine_log" >&2; die "dockerd exited at start (log above)"; }
    sleep 1
  done
  tail -20 "$engine_log" >&2
  die "dockerd did not answer on $REALTIME_CI_DOCKER_HOST within 60 s (log above)"
}

stop() {
  if [[ ! -f $marker ]]; then
    log "no engine started by this script: nothing to stop"
    return
  fi
  if [[ -f $pidfile ]]; then
    local pid
    pid=$(cat "$pidfile")
    log "stopping dockerd (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "dockerd still running after 30 s: SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  # What it made: its data (images, volumes), its runtime state, its bridge.
  # Mounts a killed engine left behind (container root filesystems, netns), deepest first.
  awk -v a="$data_root/" -v b="$exec_root/" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/mounts \
    | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$data_root" "$exec_root" "$pidfile" "$socket" "$engine_log"
  # Its default bridge, unless another engine (which shares it) still runs.
  pgrep -x dockerd >/dev/null || ip link delete docker0 2>/dev/null || true
  rm -f "$marker"
  log "stopped and removed $data_root"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  started) [[ -f $marker ]] ;;
  *) die "usage: engine.sh start|stop|started" ;;
esac
