#!/usr/bin/env bash
# The compose federation end to end on one machine without a registry (run as root; what
# tests/e2e/test_compose_federation.py runs too, see oscar_demo/docker_local.py):
#   1. a private dockerd (no bridge, no iptables: it touches nothing on the host network),
#   2. a base image from a minimal Debian rootfs (debootstrap, `docker import`), kept in /var/cache/oscar-docker,
#   3. docker/Dockerfile built by `docker-compose build` (docker/compose.local.yml), pip reading the wheels
#      this host's pip downloads (once) from a mirror on 127.0.0.1,
#   4. demo data + tiny models; the server side (certs, superlink, serverapp, control, client 1) as one compose
#      project, client 2 as another (its own volumes, only the server's ca.crt and its key: compose.client.yml),
#      host networking, everything on 127.0.0.1, until the `control` container's run finishes,
#   5. the logs and the report's client table; then everything is taken down (containers, volumes, dockerd).
# Usage: docker/run-local.sh [WORKDIR]      (default: /var/tmp/oscar-compose)
# System packages: scripts/install-system-packages.sh
set -euo pipefail
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
cd "$PROJECT"
exec "$PROJECT/.venv/bin/python" -m oscar_demo.docker_local "$@"
