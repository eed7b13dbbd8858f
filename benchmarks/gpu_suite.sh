#!/usr/bin/env bash
# The prepared device run (one call of the device tool): CUDA checks, then every GPU benchmark,
# each under its own time limit, one JSON line each into $OUT/bench.jsonl (failures recorded too).
# One that would run past DEADLINE seconds (default 570) is skipped and recorded as such.
#   device run: bash benchmarks/gpu_suite.sh [DEADLINE]   (carry: .whl)
# The device image has torch but not pydantic, timm 1.0.31 or faiss: download their Python 3.12
# wheels here first (git-ignored via .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     faiss-cpu==1.15.1 timm==1.0.31
set -u
DEADLINE=${1:-570}
OUT=${OUT:-/tmp/dino-bench}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
bash benchmarks/build_ext.sh || echo "C extensions not built (no gcc or Python headers?): augment: pil and the bf16 k-NN unavailable"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"

bench() {  # bench SECONDS NAME MODULE ARGS...
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  if [ $((SECONDS + limit)) -gt "$DEADLINE" ]; then
    echo "{\"name\": \"$name\", \"skipped\": true}" >>"$OUT/bench.jsonl"
    return
  fi
  if ! timeout "$limit" python3 -m "$@" >"$OUT/$name.json" 2>>"$OUT/log.txt"; then
    echo "{\"benchmark\": \"$name\", \"failed\": true, \"rc\": $?}" >"$OUT/$name.json"
  fi
  tail -n 1 "$OUT/$name.json" | sed "s/^{/{\"name\": \"$name\", /" >>"$OUT/bench.jsonl"
  echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"
}

bench 120 cuda_check benchmarks.cuda_check
step_pair() {  # step_pair NAME ARGS...: the step eager, then recorded as a CUDA graph (pretrain.cuda_graphs)
  local name=$1; shift
  bench 60 "$name" benchmarks.step "$@"
  bench 60 "${name}_graphs" benchmarks.step "$@" --cuda-graphs
}
step_pair step_s16_b64 --arch vit_small --patch 16 --batch 64
step_pair step_s16_b256 --arch vit_small --patch 16 --batch 256 --steps 10
step_pair step_b16_b64 --arch vit_base --patch 16 --batch 64
step_pair step_s8_b32 --arch vit_small --patch 8 --batch 32 --steps 10
bench 150 e2e_s16_pil16_graphs benchmarks.e2e --images 2048 --workers 16 --augment pil --workdir /tmp/e2e --steps 20 --cuda-graphs
bench 45 extract_s16 benchmarks.extract --arch vit_small --patch 16 --batch 512 --batches 20
bench 45 extract_s8 benchmarks.extract --arch vit_small --patch 8 --batch 256 --batches 10
bench 45 augment_cuda benchmarks.augment --device cuda --batch 64 --pil-images 40
bench 45 augment_cuda_b256 benchmarks.augment --device cuda --batch 256 --pil-images 20
bench 90 e2e_s16_batch4_graphs benchmarks.e2e --images 2048 --workers 4 --augment batch --workdir /tmp/e2e --steps 20 --cuda-graphs
bench 60 knn_16cores benchmarks.knn --train 100000 --test 10000
bench 150 step_s16_b64_compile benchmarks.step --arch vit_small --patch 16 --batch 64 --compile
tail -n 40 "$OUT/log.txt" > "$OUT/log_tail.txt"
