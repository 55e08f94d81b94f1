#!/usr/bin/env bash
# The GPU acceptance check: one prepared command for a machine with a GPU (the device tool's, or yours).
#
# Run from the repository root, results under $OUT (about 8 minutes on one H200):
#   a. the real server stages on CUDA with full-size architectures (scripts/gpu_check.py): SD-1.4, CLIP
#      ViT-B/32 and ResNet-18 with random weights saved under their hub ids on the machine (nothing is
#      downloaded), a run directory of 2 clients x 50 classes (100 stored uploads of random unit means),
#      then oscar-synthesize (200 images, PNGs written, torch.compile on), oscar-train, and oscar-synthesize
#      again, which must generate nothing; TORCH_LOGS=recompiles, and any recompilation fails the check;
#   b. a whole federation on the GPU with tiny models: `python -m oscar_demo.demo --device cuda` (real
#      SuperLink and SuperNodes on 127.0.0.1, clients captioning on CUDA, server stages on CUDA), which
#      must end `completed` with its stages on CUDA;
#   c. oscar-bench's full-size sections (peak, synthesis, training, inversion, client, server estimate) in
#      the time left (BUDGET seconds in all, default 480; sections that do not fit are skipped and say so).
# Each check adds a row to $OUT/summary.md as it finishes. Also in $OUT: gpu-check.log (everything printed),
# stages.log, synthesis-summary.json, training-summary.json, demo-report.json, bench/bench.json, bench/bench.md.
# STEPS="a b c" (the default) picks steps; GPU_CHECK_TINY=1 GPU_CHECK_DEVICE=cpu GPU_CHECK_NO_WHEELS=1 runs
# them on tiny configs on a CPU with the installed packages (make test runs step a so, in
# tests/unit/test_gpu_check.py).
#
# Wheels. The GPU machine's image has torch, transformers, accelerate, huggingface_hub, numpy, scipy,
# grpcio, protobuf, click, rich, typer, requests, pyyaml, attrs, absl-py, scikit-image and pandas, and no
# package registry. It never gets another torch. What it lacks travels in .whl/ (git-ignored through
# .git/info/exclude) and is installed with --no-deps into /tmp/site; fill it here with this one line:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     flwr==1.42.0 diffusers==0.42.1 importlib_metadata==10.2.0 open_clip_torch==3.3.0 alembic==1.20.1 \
#     mako==1.4.3 sqlalchemy==2.1.9 greenlet==3.5.6 fastapi==0.138.2 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 starlette==1.3.1 uvicorn==0.49.0 prompt-toolkit==3.0.53 \
#     wcwidth==0.9.4 iterators==0.0.2 pycryptodome==3.24.1 grpcio-health-checking==1.81.1 grpcio==1.85.3 \
#     protobuf==6.33.6 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 tomli==2.5.0 tomli-w==1.2.0 \
#     dp-accounting==0.6.0 dm-tree==0.1.10 mlxtend==0.25.0
#
# (30 wheels, 35 MB: Flower and what its SuperLink imports, diffusers, open_clip_torch for the real CLIP BPE
# vocabulary, dp-accounting for the clients, mlxtend for the demo's digits.) With the device tool: carry
# [".whl"], timeout_s 560, command `bash scripts/gpu-check.sh`.
#
# What only this script tests (CUDA-only branches; everything else runs on the CPU in make test):
#   synthesis: bf16/fp16 pipeline dtype, batch size from free GPU memory, TF32 and cuDNN autotuning,
#     torch.compile through Triton (CPU tests compile through inductor's C++ backend), GPU-side uint8;
#   training: channels_last, cuDNN benchmark, bf16 autocast on CUDA, the image cache in GPU memory,
#     device-side checkpoint snapshots, DDP over NCCL and SyncBatchNorm on CUDA (one GPU here: the
#     multi-process path runs on CPU with gloo in make test);
#   inversion: the chunk size from free GPU memory, TF32 matmuls;
#   clients: captioning in fp16 on CUDA, the batch size from free GPU memory, pinned-memory loading;
#   stage summaries: peak GPU memory.
set -uo pipefail
: "${OUT:?OUT must name the folder whose files come back (the device tool sets it)}"
cd "$(dirname "$0")/.."
STEPS="${STEPS:-a b c}"
BUDGET="${BUDGET:-480}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
WORK="${GPU_CHECK_WORK:-/tmp/oscar-gpu-check}"
START=$SECONDS
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OSCAR_PROGRESS=log
summary_row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$OUT/summary.md"; echo "[gpu-check] $1 $2: $3: $4"; }
[ -f "$OUT/summary.md" ] || printf '| step | check | result | figures |\n|---|---|---|---|\n' > "$OUT/summary.md"

# 0. Carried wheels, then everything the three steps import: a missing one fails here, in seconds.
if [ -z "${GPU_CHECK_NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { summary_row 0 "install .whl" FAILED "pip install --target /tmp/site failed"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
if ! python3 - <<'EOF'
import importlib, sys
import torch, transformers
names = ["diffusers", "accelerate", "safetensors", "flwr.serverapp", "flwr.clientapp", "flwr.superlink",
         "uvicorn", "fastapi", "sqlalchemy", "alembic", "cryptography", "dp_accounting", "mlxtend", "skimage",
         "oscar_server.server_app", "oscar_client.client_app", "oscar_bench.cli", "oscar_demo.demo"]
missing = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - every reason counts: a missing wheel or a version clash
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
import diffusers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "| transformers", transformers.__version__, "| diffusers", diffusers.__version__ if "diffusers" in sys.modules else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("no triton: torch.compile will fail on CUDA and the stage falls back to eager (its log says so)")
if missing:
    sys.exit("cannot import: " + "; ".join(missing))
EOF
then
  summary_row 0 imports FAILED "see gpu-check.log: add the missing wheel to .whl (the header's pip download line)"
  exit 1
fi
summary_row 0 imports passed "torch $(python3 -c 'import torch; print(torch.__version__)'), $(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")')"
status=0

if [[ " $STEPS " == *" a "* ]]; then
  python3 scripts/gpu_check.py stages --work "$WORK/stages" --out "$OUT" --device "$DEVICE" \
    ${GPU_CHECK_TINY:+--tiny --classes 6 --classes-per-client 3 --set inversion-steps=10 num-inference-steps=3 classifier-image-size=32 epochs=2} \
    || status=1
fi

if [[ " $STEPS " == *" b "* ]]; then
  started=$SECONDS
  python3 -m oscar_demo.demo --workdir "$WORK/demo" --device "$DEVICE" --quiet
  code=$?
  report=$(ls -t "$WORK"/demo/runs/*/report.json 2>/dev/null | head -n 1)
  [ -n "$report" ] && cp "$report" "$OUT/demo-report.json"
  python3 scripts/gpu_check.py federation --out "$OUT" --device "$DEVICE" --exit-code $code \
    --seconds $((SECONDS - started)) $report || status=1
fi

if [[ " $STEPS " == *" c "* ]]; then
  left=$((BUDGET - (SECONDS - START) - 20))
  if [ $left -lt 60 ]; then
    summary_row c oscar-bench skipped "$left s of the $BUDGET s budget left; rerun with STEPS=c"
  else
    started=$SECONDS
    python3 -m oscar_bench --out "$OUT/bench" --budget-seconds "$left" ${GPU_CHECK_TINY:+--tiny} --device "$DEVICE"
    code=$?
    python3 scripts/gpu_check.py bench --out "$OUT" --exit-code $code --seconds $((SECONDS - started)) \
      "$OUT/bench/bench.json" || status=1
  fi
fi
echo "[gpu-check] done in $((SECONDS - START)) s; $OUT/summary.md:"
cat "$OUT/summary.md"
exit $status
