#!/usr/bin/env bash
# The prepared device run (one call of the device tool): CUDA checks, then the GPU benchmarks, the
# most telling first, each under its own time limit, one JSON line each into $OUT/bench.jsonl
# (failures recorded with their exit status). One that could run past DEADLINE seconds (default
# 480, which leaves a 15-minute device budget room to start the machine and rerun) is skipped
# and recorded as such.
#   device run: bash benchmarks/gpu_suite.sh [DEADLINE]   (carry: .whl, see benchmarks/device_env.sh)
set -u
DEADLINE=${1:-480}
OUT=${OUT:-/tmp/dino-bench}
mkdir -p "$OUT"
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"

bench() {  # bench SECONDS NAME MODULE ARGS...
  local limit=$1 name=$2; shift 2
  local start=$SECONDS
  if [ $((SECONDS + limit)) -gt "$DEADLINE" ]; then
    echo "{\"name\": \"$name\", \"skipped\": true}" >>"$OUT/bench.jsonl"
    return
  fi
  timeout "$limit" python3 -m "$@" >"$OUT/$name.json" 2>>"$OUT/log.txt"
  local rc=$?  # 124: past its limit
  if [ $rc -ne 0 ]; then
    echo "{\"benchmark\": \"$name\", \"failed\": true, \"rc\": $rc}" >"$OUT/$name.json"
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
# one figure per goal of issue 7 first (step, extraction, GPU augmentation, end to end), then the rest
step_pair step_s16_b64 --arch vit_small --patch 16 --batch 64
bench 45 extract_s16 benchmarks.extract --arch vit_small --patch 16 --batch 512 --batches 20
bench 45 augment_cuda benchmarks.augment --device cuda --batch 64 --pil-images 40
bench 90 e2e_s16_batch4_graphs benchmarks.e2e --images 2048 --workers 4 --augment batch --workdir /tmp/e2e --steps 20 --cuda-graphs
step_pair step_s16_b256 --arch vit_small --patch 16 --batch 256 --steps 10
step_pair step_b16_b64 --arch vit_base --patch 16 --batch 64
step_pair step_s8_b32 --arch vit_small --patch 8 --batch 32 --steps 10
bench 45 extract_s8 benchmarks.extract --arch vit_small --patch 8 --batch 256 --batches 10
bench 60 knn_16cores benchmarks.knn --train 100000 --test 10000
bench 150 e2e_s16_pil16_graphs benchmarks.e2e --images 2048 --workers 16 --augment pil --workdir /tmp/e2e --steps 20 --cuda-graphs
bench 45 augment_cuda_b256 benchmarks.augment --device cuda --batch 256 --pil-images 20
bench 150 step_s16_b64_compile benchmarks.step --arch vit_small --patch 16 --batch 64 --compile
tail -n 40 "$OUT/log.txt" > "$OUT/log_tail.txt"
