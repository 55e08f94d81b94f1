#!/usr/bin/env bash
# OSCAR on DomainNet (6 domains = 6 clients, 90 classes). DATA: the official download unpacked,
#   $DATA/<domain>/<class>/*.jpg and $DATA/<domain>_train.txt, <domain>_test.txt (or $DATA/splits/).
#
# Simulation, one GPU machine:   DATA=/data/domainnet examples/domainnet/run.sh simulate
# Deployment: on the server `flower-superlink --insecure --disable-runtime-dependency-installation`,
# on each client machine (its domain's folder and split files under /data/domainnet) one SuperNode:
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/domainnet' client='clipart'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/domainnet' client='infograph'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/domainnet' client='painting'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/domainnet' client='quickdraw'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/domainnet' client='real'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/domainnet' client='sketch'"
# then, where the split files are (they are enough to list the classes):
#   DATA=/data/domainnet CONNECTION=oscar examples/domainnet/run.sh submit
BENCH=domainnet SUBSET=oscar90 EXAMPLE=$(dirname "$0") DATA=${DATA:-/data/domainnet} \
  exec "$(dirname "$0")/../benchmark.sh" "$@"
