#!/usr/bin/env bash
# System packages the test suite and docker/run-local.sh need (Debian; run as root):
#   iproute2        `ip netns`: the separate-hosts test (tests/e2e/test_netns.py)
#   docker-compose  a real compose implementation: tests/unit/test_compose.py validates docker/compose.yml
#   docker.io, debootstrap   the compose federation run for real (tests/e2e/test_compose_federation.py,
#                   docker/run-local.sh): a private dockerd, and a Debian base image made without a registry
# Usage: scripts/install-system-packages.sh
set -euo pipefail
packages=(iproute2 docker-compose docker.io debootstrap)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  # `make test` still runs; the tests that need these packages skip and say why.
  echo "warning: not root, cannot install: ${missing[*]} (the tests that need them will be skipped)" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
