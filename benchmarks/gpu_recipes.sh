#!/usr/bin/env bash
# Issue 8's device run: a preset and variants of it side by side on one GPU
# (benchmarks.gpu_recipes, sized to the time left), then GPU benchmarks while time remains.
#   device run (carry .whl .fmnist): [EPOCHS=60] bash benchmarks/gpu_recipes.sh SECONDS PRESET NAME="key=value ..." ...
# .whl: see benchmarks/device_env.sh; .fmnist: the four Fashion-MNIST .gz files
# (cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/; both git-ignored).
set -u
LIMIT=$1 PRESET=$2
shift 2
OUT=${OUT:-/tmp/dino-recipes}
mkdir -p "$OUT"
source benchmarks/device_env.sh
if [ -d .fmnist ]; then
  mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/*.gz /usr/share/datasets/fashion-mnist/
fi
export OMP_NUM_THREADS=4 RECIPE_PROBES=${RECIPE_PROBES:-/tmp/probes}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } >"$OUT/gpu.txt" 2>&1
nvidia-smi dmon -s um -d 5 >"$OUT/dmon.txt" 2>&1 &

python3 -m benchmarks.gpu_recipes --deadline-s $((LIMIT - SECONDS - 45)) --epochs "${EPOCHS:-60}" --preset "$PRESET" \
  --out "$OUT/recipes.jsonl" "$@" 2>&1 | grep -v "pretrain:" >"$OUT/driver.txt"
for variant in "$@"; do
  run=${variant%%=*}
  cat "$RECIPE_PROBES/$run/log.jsonl" >>"$OUT/curves.jsonl" 2>/dev/null
  { echo "== $run"; grep -m 3 -i "collapse" "$RECIPE_PROBES/$run/stdout.txt"  # the guard's warnings
    tail -c 2000 "$RECIPE_PROBES/$run/stdout.txt"; echo; } >>"$OUT/tails.txt" 2>/dev/null
done
if [ $((LIMIT - SECONDS)) -gt 80 ]; then
  timeout 60 python3 -m benchmarks.step --arch vit_small --patch 16 --batch 64 >>"$OUT/bench.jsonl" 2>>"$OUT/tails.txt"
fi
if [ $((LIMIT - SECONDS)) -gt 60 ]; then
  timeout 45 python3 -m benchmarks.augment --device cuda --batch 64 --pil-images 40 >>"$OUT/bench.jsonl" 2>>"$OUT/tails.txt"
fi
echo "total $SECONDS s" >>"$OUT/gpu.txt"
