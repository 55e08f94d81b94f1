#!/usr/bin/env bash
# The compose federation end to end on one machine without a registry (run as root):
#   1. a private dockerd (vfs storage, no bridge, no iptables: it touches nothing on the host network),
#   2. a local base image: a minimal Debian rootfs made with debootstrap and `docker import`ed,
#   3. demo data + tiny models, TLS material made by the compose file's own `certs` service,
#   4. `docker-compose up` of docker/compose.yml + docker/compose.local.yml (host networking, the
#      checkout and its venv mounted read-only), until the `control` container's run finishes,
#   5. the report's client table; then everything is taken down (containers, volumes, dockerd).
# Usage: docker/run-local.sh [WORKDIR]      (default: /var/tmp/oscar-compose; the rootfs is kept there)
set -euo pipefail
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mkdir -p "${1:-/var/tmp/oscar-compose}" && cd "${1:-/var/tmp/oscar-compose}" && pwd)
PY="$PROJECT/.venv/bin/python"
DOCKERD_DIR="$WORK/dockerd"
export DOCKER_HOST="unix://$DOCKERD_DIR/docker.sock"
export OSCAR_LOCAL_IMAGE=oscar-local-base
for tool in dockerd docker-compose debootstrap; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-system-packages.sh" >&2; exit 2; }
done

# -- 1. dockerd, stopped by its PID on exit ------------------------------------------------------
mkdir -p "$DOCKERD_DIR"
dockerd --storage-driver=vfs --bridge=none --iptables=false --ip6tables=false \
  --host "$DOCKER_HOST" --data-root "$DOCKERD_DIR/data" --exec-root "$DOCKERD_DIR/exec" \
  --pidfile "$DOCKERD_DIR/dockerd.pid" >"$DOCKERD_DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
cleanup() {
  docker-compose "${COMPOSE[@]}" down --volumes --timeout 10 >/dev/null 2>&1 || true
  kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null || true
}
COMPOSE=(-p "oscar$$" -f "$PROJECT/docker/compose.yml" -f "$PROJECT/docker/compose.local.yml")
trap cleanup EXIT
for _ in $(seq 60); do docker version >/dev/null 2>&1 && break; sleep 1; done
docker version --format 'dockerd {{.Server.Version}} up'

# -- 2. base image from a Debian rootfs (python3 brings the shared libraries the venv's Python needs) --
if ! docker image inspect "$OSCAR_LOCAL_IMAGE" >/dev/null 2>&1; then
  if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null ||
             awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$WORK/rootfs" "$mirror" \
      >"$WORK/debootstrap.log" 2>&1
  fi
  tar -C "$WORK/rootfs" -c . | docker import - "$OSCAR_LOCAL_IMAGE" >/dev/null
fi
echo "base image: $(docker image inspect "$OSCAR_LOCAL_IMAGE" --format '{{.Id}} {{.Size}} bytes')"

# -- 3. data, models, run config ------------------------------------------------------------------
rm -rf "$WORK/server"
"$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path
import tomli_w
from oscar_demo.demo import demo_run_config, prepare
work = Path(sys.argv[1])
prepare(work, per_class=6)
config = demo_run_config(Path("/state/runs"), "compose", **{"images-per-class": 2, "num-inference-steps": 10,
                         "inversion-steps": 40, "epochs": 1, "min-clients": 2})
(work / "run-config.toml").write_text(tomli_w.dumps(config))
EOF
export OSCAR_PROJECT="$PROJECT" OSCAR_WORK="$WORK"
OSCAR_PYTHON_HOME=$("$PY" -c 'import sys; print(sys.base_prefix)'); export OSCAR_PYTHON_HOME
export MODEL_CACHE="$WORK/hf-cache" CLIENT1_DATA="$WORK/data/plain" CLIENT2_DATA="$WORK/data/textured"
export RUN_CONFIG="$WORK/run-config.toml"
export SUPERLINK_HOST=127.0.0.1 BIND_HOST=127.0.0.1 CLIENT1_HOST=127.0.0.1 CLIENT2_HOST=127.0.0.1
SUPERLINK_PORT=$("$PY" -c 'from oscar_demo.federation import free_port; print(free_port())'); export SUPERLINK_PORT
CLIENT1_PORT=$("$PY" -c 'from oscar_demo.federation import free_port; print(free_port())'); export CLIENT1_PORT
CLIENT2_PORT=$("$PY" -c 'from oscar_demo.federation import free_port; print(free_port())'); export CLIENT2_PORT

# -- 4. the federation ------------------------------------------------------------------------------
started=$(date +%s)
# Not `up --exit-code-from control`: that aborts on the first container to exit (certs is one-shot,
# and a SuperNode exits until its key is registered, then restarts).
docker-compose "${COMPOSE[@]}" up --no-build --detach
docker-compose "${COMPOSE[@]}" logs --follow --no-color >"$WORK/compose.log" 2>&1 &
LOGS_PID=$!
code=$(docker wait "$(docker-compose "${COMPOSE[@]}" ps -q control)")
kill "$LOGS_PID" 2>/dev/null || true
cat "$WORK/compose.log"
echo "compose up exited with $code after $(( $(date +%s) - started ))s"

# -- 5. the result ------------------------------------------------------------------------------------
report="$WORK/server/runs/compose/report.json"
[ -f "$report" ] || { echo "no report at $report" >&2; exit 1; }
"$PY" - "$report" <<'EOF'
import json, sys
from oscar_server.report import client_table
report = json.load(open(sys.argv[1]))
print(f"status: {report['status']}  rejected: {report['rejected']}")
print(client_table(report))
sys.exit(0 if report["status"] == "completed" else 1)
EOF
exit "$code"
