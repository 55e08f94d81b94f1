#!/usr/bin/env bash
# Shared steps of the benchmark recipes (examples/<benchmark>/run.sh sets BENCH, DATA, EXAMPLE, and
# optionally SUBSET and TEST_ROOT). Run from the project root.
#   simulate: Flower's simulation engine on this machine, 6 virtual clients (client k = the k-th client)
#   submit:   deployment: submit to the SuperLink of connection $CONNECTION (SuperNodes already up)
#   toml:     only write the run config (run.toml + the class names) and print its path
set -euo pipefail
: "${BENCH:?}" "${DATA:?}" "${EXAMPLE:?}"
SUBSET=${SUBSET:-}
WORK=${WORK:-runs/$BENCH}
mkdir -p "$WORK"

# flwr run takes one TOML file: the recipe's settings plus the class list read from the benchmark.
RUN_TOML=$WORK/run.toml
cp "$EXAMPLE/run.toml" "$RUN_TOML"
oscar-class-names --benchmark "$BENCH" --root "$DATA" --subset "$SUBSET" --toml >> "$RUN_TOML"

case "${1:-}" in
  toml)
    echo "$RUN_TOML" ;;
  simulate)
    echo "benchmark-root = \"$DATA\"" >> "$RUN_TOML"
    if [[ -n "${TEST_ROOT:-}" ]]; then echo "test-root = \"$TEST_ROOT\"" >> "$RUN_TOML"; fi
    # A private Flower home, so ~/.flwr/config.toml is left alone. Six virtual SuperNodes sharing the GPU.
    export FLWR_HOME=$PWD/$WORK/flwr-home
    mkdir -p "$FLWR_HOME"
    cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "sim"

[superlink.sim]
address = ":local:"
options.num-supernodes = 6
options.backend.client-resources.num-cpus = 2
options.backend.client-resources.num-gpus = ${CLIENT_GPUS:-0.15}
TOML
    flwr run . sim --stream --run-config "$RUN_TOML" ;;
  submit)
    flwr run . "${CONNECTION:-oscar}" --stream --run-config "$RUN_TOML" ;;
  *)
    echo "usage: $0 simulate|submit|toml" >&2; exit 2 ;;
esac
