#!/usr/bin/env bash
# OSCAR on OpenImage (20 super-classes x 6 sub-classes; client k = the k-th sorted sub-class of each
# super-class; labels = super-classes). DATA holds two trees of the same layout (docs/reproducing.md):
#   $DATA/train/<super-class>/<sub-class>/*.jpg   and   $DATA/test/<super-class>/<sub-class>/*.jpg
#
# Simulation, one GPU machine:   DATA=/data/openimage examples/openimage/run.sh simulate
# Deployment: `flower-superlink --insecure --disable-runtime-dependency-installation` on the server, and
# one SuperNode per client machine (client k is counted over the sub-class folders present, so keep all
# six sub-class folders on every machine; only client k's need images):
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/openimage/train' test-root='/data/openimage/test' client-index=0"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/openimage/train' test-root='/data/openimage/test' client-index=1"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/openimage/train' test-root='/data/openimage/test' client-index=2"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/openimage/train' test-root='/data/openimage/test' client-index=3"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/openimage/train' test-root='/data/openimage/test' client-index=4"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/openimage/train' test-root='/data/openimage/test' client-index=5"
# then:   DATA=/data/openimage CONNECTION=oscar examples/openimage/run.sh submit
DATA=${DATA:-/data/openimage}
BENCH=openimage EXAMPLE=$(dirname "$0") TEST_ROOT=$DATA/test DATA=$DATA/train \
  exec "$(dirname "$0")/../benchmark.sh" "$@"
