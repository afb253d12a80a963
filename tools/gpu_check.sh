#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA torch and no network (e.g. the lent H100, whose
# system Python has torch, pytest and numpy): build the extension in place with its CUDA kernels, run the whole
# test suite (the `cuda` tests then run instead of skipping) and the op benchmark on the GPU.
# Logs and the benchmark JSON go to $OUT (default: gpu_check_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.__version__, torch.cuda.get_device_name())"

echo "== build (in place)"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} MAX_JOBS=${MAX_JOBS:-8} \
  "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -c "from deepfusion_ref import ops; assert ops.kernel_available('dynamic_threshold', 'cuda'), 'CUDA kernel not built'"

echo "== pytest"
"$PY" -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest.log"

echo "== bench"
for dtype in float32 bfloat16; do
  "$PY" bench/ops.py --device cuda --dtype "$dtype" --json "$OUT/bench_cuda_$dtype.json" 2>&1 | tee -a "$OUT/bench.txt"
done
