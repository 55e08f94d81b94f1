#!/usr/bin/env bash
# oscar-bench on a lent GPU machine, as one prepared command (see the device tool's README).
#
# The GPU image has torch, transformers, accelerate and huggingface_hub but neither diffusers nor
# open_clip_torch (whose wheel carries the real CLIP BPE vocabulary), and it cannot reach any package
# registry: their wheels travel in .whl/ (git-ignored through .git/info/exclude). Fetch them here first:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 open_clip_torch==3.3.0
#
# then run, from the repository root, with the device tool (carry [".whl"], timeout_s 560):
#
#   bash scripts/gpu-bench.sh
#
# The synthesis section times the synthesis stage's path at the run config's defaults, so on CUDA it
# torch.compiles the UNet and VAE decoder first (about a minute on an H200; bench.json's "compile s"). The
# preamble below prints what torch.compile needs (triton, a C compiler): if compiling fails, the stage and
# the bench fall back to the eager pipeline and the synthesis notes say so.
#
# It writes $OUT/bench/bench.json, $OUT/bench/bench.md and $OUT/bench.log. BUDGET (seconds, default 420)
# is the benchmark's own time budget; sections shrink optional work to fit it and the last one may overrun
# it a little, so give the tool's timeout some two minutes more. BENCH_ARGS adds oscar-bench options
# (e.g. "--sections synthesis training" for a rerun of two sections).
set -euo pipefail
: "${OUT:?OUT must name the folder whose files come back (the device tool sets it)}"
cd "$(dirname "$0")/.."

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OSCAR_PROGRESS=log

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)" || echo "no triton: torch.compile will fail"
  echo "C compiler: $(command -v cc || command -v gcc || echo none)"
} 2>&1 | tee "$OUT/bench.log"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
python3 -m oscar_bench --out "$OUT/bench" --budget-seconds "${BUDGET:-420}" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
