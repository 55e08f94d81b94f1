#!/usr/bin/env bash
# OSCAR on NICO++, common-domain setting (6 domains = 6 clients, 60 classes). DATA (FedCADO's layout):
#   $DATA/NICO_DG/<domain>/<class>/*.jpg and $DATA/NICO_DG_official/<domain>_train.txt, <domain>_test.txt
#
# Simulation, one GPU machine:   DATA=/data/NICOpp examples/nico-dg/run.sh simulate
# Deployment: `flower-superlink --insecure --disable-runtime-dependency-installation` on the server, and
# one SuperNode per client machine:
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client='autumn'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client='dim'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client='grass'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client='outdoor'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client='rock'"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client='water'"
# then, where the split lists are:   DATA=/data/NICOpp CONNECTION=oscar examples/nico-dg/run.sh submit
BENCH=nico-dg EXAMPLE=$(dirname "$0") DATA=${DATA:-/data/NICOpp} exec "$(dirname "$0")/../benchmark.sh" "$@"
