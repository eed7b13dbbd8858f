# Sourced by the device scripts (gpu_suite.sh, gpu_recipes.sh) with $OUT set: the Python packages
# the device image lacks, installed from the carried .whl/ (NO_WHEELS=1: none), checked before any
# GPU time is spent (exit 3 naming what is missing), and the C extensions built.
# .whl/ holds the Python 3.12 wheels of pydantic, timm 1.0.31 and faiss; download them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     faiss-cpu==1.15.1 timm==1.0.31
export PYTHONPATH=$PWD
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
if ! python3 -c "import torch, pydantic, timm, faiss" 2>"$OUT/import_error.txt"; then
  echo "missing Python packages: carry .whl (see benchmarks/device_env.sh)" | tee -a "$OUT/import_error.txt" >&2
  exit 3
fi
export PYTHONUNBUFFERED=1
bash benchmarks/build_ext.sh || echo "C extensions not built (no gcc or Python headers?): augment: pil and the bf16 k-NN unavailable" >&2
