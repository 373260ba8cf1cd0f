#!/usr/bin/env bash
# CI only: builds, from a Debian root filesystem and PyPI, stand-ins for the registry images the
# Dockerfiles, the compose file and the testcontainers tests ask for (no registry answers in CI).
# A user's build and `docker compose up` keep the real images: the stand-ins enter only through
# build arguments and deploy/compose/compose.ci.yaml.
#
#   scripts/containers/stand-ins.sh                 # every stand-in
#   scripts/containers/stand-ins.sh redis rabbitmq  # only these (and the Debian base)
#
# Images: localhost/realtime-ci/<name>:<tag>. Python is Debian bookworm's CPython 3.11 (the real
# images use 3.12); Redis 7.0, RabbitMQ 3.10 and Prometheus 2.42 are Debian's versions; uv is
# PyPI's uv==0.13.9 wheel, the binary ghcr.io/astral-sh/uv:0.13.9 carries. Grafana and Jaeger have
# no Debian package: `grafana` and `jaeger` are HTTP sinks that answer 200 on their ports (so the
# compose file's health checks and the services' OTLP export have a peer), nothing more.
#
# Environment: REALTIME_CI_ROOTFS (default /var/tmp/rootfs-bookworm) is debootstrapped when it
# is missing or incomplete; DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
prefix=localhost/realtime-ci
rootfs=${REALTIME_CI_ROOTFS:-/var/tmp/rootfs-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
uv_version=0.13.9

all=(python uv redis rabbitmq prometheus blackbox-exporter grafana jaeger)
wanted=("$@")
[[ ${#wanted[@]} -gt 0 ]] || wanted=("${all[@]}")

LOG_NAME=stand-ins
# shellcheck source=scripts/containers/lib.sh
source "$root/scripts/containers/lib.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

docker info >/dev/null 2>&1 || die "no container engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}); start one with scripts/containers/engine.sh start"

# Builds <tag> from a Dockerfile on stdin, with the host's network (a build on a bridge has
# none when the engine runs with --iptables=false) and a context directory (default: empty).
build() {  # tag [context]
  local tag=$1 context=${2:-}
  if [[ -z $context ]]; then context=$(mktemp -d -p "$work"); fi
  DOCKER_BUILDKIT=1 docker build --quiet --network host -t "$tag" -f - "$context" >/dev/null
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# --- the Debian base: debootstrap once, import once ------------------------------------------
base="$prefix/debian:bookworm"
if ! have_image "$base"; then
  # debootstrap removes <rootfs>/debootstrap when it finishes: its presence means a cut-off run.
  if [[ ! -x $rootfs/usr/bin/apt-get || -d $rootfs/debootstrap ]]; then
    command -v debootstrap >/dev/null \
      || { log "installing debootstrap"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
    rm -rf "$rootfs"
    timed "debootstrap bookworm into $rootfs" \
      debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
    # ci.sh removes a root filesystem it made, when it also started the engine.
    touch "$rootfs/.made-by-realtime-ci"
  fi
  timed "import $base" bash -c "tar -C '$rootfs' -c . | docker import - '$base' >/dev/null"
fi

# Every stand-in starts here: apt that never starts services, installs no recommends, keeps no lists.
apt_base="$prefix/apt:bookworm"
timed "$apt_base" build "$apt_base" <<DOCKERFILE
FROM $base
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && echo 'deb $mirror bookworm main' > /etc/apt/sources.list \
 && printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' > /etc/apt/apt.conf.d/90ci
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
DOCKERFILE

install() { echo "RUN apt-get update -qq && apt-get install -y -qq $* >/dev/null && rm -rf /var/lib/apt/lists/*"; }

build_python() {
  # The machine's extra CA certificates (a TLS-intercepting proxy) let a `uv sync` inside a build
  # reach PyPI. They live in this CI-only base and nowhere in the project's files.
  local ctx
  ctx=$(mktemp -d -p "$work")
  mkdir "$ctx/ca"
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/"
  fi
  build "$prefix/python:3.11" "$ctx" <<DOCKERFILE
FROM $apt_base
$(install python3 python3-venv ca-certificates)
COPY ca/ /usr/local/share/ca-certificates/
# The real python images keep the interpreter in /usr/local/bin (UV_PYTHON in the Dockerfiles).
RUN update-ca-certificates >/dev/null \
 && ln -s /usr/bin/python3 /usr/local/bin/python3 && ln -s /usr/bin/python3 /usr/local/bin/python
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
DOCKERFILE
}

build_uv() {
  # The binary of PyPI's wheel is the one the uv image carries at /uv.
  local ctx
  ctx=$(mktemp -d -p "$work")
  uv pip install --quiet --no-deps --target "$ctx/wheel" "uv==$uv_version"
  cp "$ctx/wheel/bin/uv" "$ctx/uv"
  rm -rf "$ctx/wheel"
  build "$prefix/uv:$uv_version" "$ctx" <<DOCKERFILE
FROM scratch
COPY uv /uv
ENTRYPOINT ["/uv"]
DOCKERFILE
}

build_redis() {
  build "$prefix/redis:7.0" <<DOCKERFILE
FROM $apt_base
$(install redis-server)
RUN mkdir /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
# Like the registry image: reachable from outside the container without a config file.
CMD ["redis-server", "--protected-mode", "no"]
DOCKERFILE
}

build_rabbitmq() {
  build "$prefix/rabbitmq:3.10" <<DOCKERFILE
FROM $apt_base
$(install rabbitmq-server)
# Like the registry's -management image: both plugins on, guest allowed from other hosts,
# logs on stdout.
RUN rabbitmq-plugins enable --offline rabbitmq_management rabbitmq_prometheus >/dev/null \
 && echo 'loopback_users.guest = false' > /etc/rabbitmq/rabbitmq.conf \
 && chown -R rabbitmq:rabbitmq /etc/rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
ENV RABBITMQ_LOGS=- HOME=/var/lib/rabbitmq
USER rabbitmq
EXPOSE 5672 15672 15692
# The server script itself (Debian's /usr/sbin wrapper sends the logs to a file and, as
# PID 1, leaves SIGTERM unhandled: docker stop then waits for its timeout).
CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
DOCKERFILE
}

build_prometheus() {
  build "$prefix/prometheus:2.42" <<DOCKERFILE
FROM $apt_base
$(install prometheus wget)
RUN mkdir /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
DOCKERFILE
}

build_blackbox_exporter() {
  build "$prefix/blackbox-exporter:0.23" <<DOCKERFILE
FROM $apt_base
$(install prometheus-blackbox-exporter wget)
USER nobody
EXPOSE 9115
ENTRYPOINT ["/usr/bin/prometheus-blackbox-exporter"]
CMD ["--config.file=/etc/prometheus/blackbox.yml"]
DOCKERFILE
}

# Grafana and Jaeger: a sink that answers 200 to any request on the ports given.
build_sink() {  # name ports...
  local name=$1 ctx
  shift
  ctx=$(mktemp -d -p "$work")
  cp "$root/scripts/containers/http-sink.py" "$ctx/"
  local ports
  ports=$(printf '"%s", ' "$@")
  build "$prefix/$name:stand-in" "$ctx" <<DOCKERFILE
FROM $prefix/python:3.11
$(install wget)
COPY http-sink.py /usr/local/bin/http-sink
USER nobody
ENTRYPOINT ["python3", "/usr/local/bin/http-sink", ${ports%, }]
DOCKERFILE
}

for name in "${wanted[@]}"; do
  case $name in
    python) timed "$prefix/python:3.11" build_python ;;
    uv) timed "$prefix/uv:$uv_version" build_uv ;;
    redis) timed "$prefix/redis:7.0" build_redis ;;
    rabbitmq) timed "$prefix/rabbitmq:3.10" build_rabbitmq ;;
    prometheus) timed "$prefix/prometheus:2.42" build_prometheus ;;
    blackbox-exporter) timed "$prefix/blackbox-exporter:0.23" build_blackbox_exporter ;;
    grafana) have_image "$prefix/python:3.11" || build_python; timed "$prefix/grafana:stand-in" build_sink grafana 3000 ;;
    jaeger) have_image "$prefix/python:3.11" || build_python; timed "$prefix/jaeger:stand-in" build_sink jaeger 4317 4318 16686 ;;
    *) die "unknown stand-in '$name' (known: ${all[*]})" ;;
  esac
done
log "ready: $(docker images --format '{{.Repository}}:{{.Tag}}' "$prefix/*" | tr '\n' ' ')"
