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

# Every key checked (names and values) before Flower sees it; `flwr run` exits 0 whatever happens to the
# run, so the run's last log line (OSCAR status: completed|partial|failed) decides this script's status.
oscar-config "$RUN_TOML" >/dev/null
run_and_check() {
  local log=$WORK/flwr-run.log
  flwr run . "$@" --stream --run-config "$RUN_TOML" 2>&1 | tee "$log"
  local status
  status=$(grep -o 'OSCAR status: [a-z]*' "$log" | tail -n 1 || true)
  echo "${status:-OSCAR status: unknown (no status line: see $log)}"
  [[ "$status" == "OSCAR status: completed" ]]
}

case "${1:-}" in
  toml)
    echo "$RUN_TOML" ;;
  simulate)
    echo "benchmark-root = \"$DATA\"" >> "$RUN_TOML"
    if [[ -n "${TEST_ROOT:-}" ]]; then echo "test-root = \"$TEST_ROOT\"" >> "$RUN_TOML"; fi
    oscar-config "$RUN_TOML" >/dev/null
    # A private Flower home, so ~/.flwr/config.toml is left alone; the installed environment is used as it
    # is (no per-run `uv sync`, which would download torch again). Six virtual SuperNodes sharing the GPU.
    export FLWR_HOME=$PWD/$WORK/flwr-home FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
    mkdir -p "$FLWR_HOME"
    printf '[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = ":local:"\n' > "$FLWR_HOME/config.toml"
    run_and_check sim --federation-config \
      "num-supernodes=6 client-resources-num-cpus=2 client-resources-num-gpus=${CLIENT_GPUS:-0.15}" ;;
  submit)
    run_and_check "${CONNECTION:-oscar}" ;;
  *)
    echo "usage: $0 simulate|submit|toml" >&2; exit 2 ;;
esac
