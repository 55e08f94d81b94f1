#!/usr/bin/env bash
# OSCAR on NICO++, unique-domain setting (client k = the k-th sorted domain of every class). DATA:
#   $DATA/NICO_unique/<class>/<domain>/*.jpg and
#   $DATA/txtlist/NICO_unique_official/<class>_<domain>_train.txt, ..._test.txt
# `oscar-class-names --benchmark nico-unique --root $DATA --clients` lists the clients.
#
# Simulation, one GPU machine:   DATA=/data/NICOpp examples/nico-unique/run.sh simulate
# Deployment: `flower-superlink --insecure --disable-runtime-dependency-installation` on the server, and
# one SuperNode per client machine:
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client-index=0"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client-index=1"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client-index=2"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client-index=3"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client-index=4"
#   flower-supernode --insecure --superlink SERVER_IP:8000 --node-config "benchmark-root='/data/NICOpp' client-index=5"
# then, where the split lists are:   DATA=/data/NICOpp CONNECTION=oscar examples/nico-unique/run.sh submit
BENCH=nico-unique EXAMPLE=$(dirname "$0") DATA=${DATA:-/data/NICOpp} exec "$(dirname "$0")/../benchmark.sh" "$@"
