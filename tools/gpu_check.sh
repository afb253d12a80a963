#!/usr/bin/env bash
# The prepared GPU run, one command for a lent H100/H200 (CUDA torch, no network; at most 16 minutes by the steps'
# time limits, about 8 expected):
#   1. build the extension in place with its CUDA kernels;
#   2. the CUDA tests (`-m cuda`) and the op tests, which compare every CUDA kernel with its reference;
#   3. bench/ops.py --device cuda in float32 and bfloat16 (fused ops vs eager, torch.compile and a copy);
#   4. bench/dit.py at about 1B parameters and 1024 image tokens, bf16, eager and compiled, with the training MFU;
#   5. bench/unet.py at 64x64 and 256x256 (Efficient vs standard vs diffusers' U-Net);
#   6. the quickstart pipeline with its GPU parameters at a small size.
# Everything goes to $OUT (default gpu_check_out/): logs, JSON, the executed notebook; a step that fails is logged and
# the run goes on, and the exit status says whether any failed.
#
# DRY_RUN=1 runs every step on the CPU at tiny sizes and without the build (the CPU extension is already built):
# CI does this (tests/test_gpu_check.py), so the GPU run cannot fail on a typo.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The GPU image has torch, transformers, accelerate and pytest but not diffusers or papermill: carry them as wheels in
# .whl/ (the device tool's README says how) and they are installed for this run only.
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
failed=()
run() {  # run NAME LIMIT_SECONDS COMMAND...: log to $OUT/NAME.log, note a failure and go on
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  local start=$SECONDS
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s): tail of $OUT/$name.log"
    tail -20 "$OUT/$name.log"
    failed+=("$name")
  fi
}

if [ "$DRY_RUN" = 1 ]; then
  DEV=cpu
  DIT=(--width 64 --depth 2 --heads 2 --tokens 16 --text-tokens 8 --batch 1 --min-time 0.01 --rounds 1)
  UNET=(--sizes 16 --width 8 --batch 1 --steps 1 --rounds 1)
  OPS=(--sizes 2x3x16x16 --min-time 0.01 --no-compile)
  QUICK=(-p steps 2 -p train_scenes 16 -p n_eval 2 -p sample_steps 2 -p batch_size 4)
  TESTS=(tests/test_isa.py -k "detected")
else
  DEV=cuda
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/device.txt" || exit 1
  run build 300 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" setup.py -q build_ext --inplace
  "$PY" -c "from deepfusion_ref import ops; assert ops.kernel_available('dynamic_threshold', 'cuda')" || exit 1
  DIT=(--width 2048 --depth 12 --heads 16 --tokens 1024 --text-tokens 128 --batch 4 --dtype bfloat16 --compile
       --min-time 0.3 --rounds 2)
  UNET=(--sizes 64 256 --width 64 --batch 8 --steps 5 --rounds 2)
  OPS=(--min-time 0.1)
  QUICK=(-p steps 300 -p train_scenes 1024 -p n_eval 16 -p batch_size 64 -p image_size 24 -p patch_size 3
         -p width 128 -p depth 4 -p num_heads 4)
  TESTS=(tests -k cuda)  # the cuda-marked tests and those named for CUDA: every CUDA kernel against its reference
fi

run tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}"
for dtype in float32 bfloat16; do
  run "ops_$dtype" 90 "$PY" bench/ops.py --device "$DEV" --dtype "$dtype" "${OPS[@]}" --json "$OUT/ops_$dtype.json"
done
run dit 150 "$PY" bench/dit.py --device "$DEV" "${DIT[@]}" --json "$OUT/dit.json"
run unet 90 "$PY" bench/unet.py --device "$DEV" "${UNET[@]}" --json "$OUT/unet.json"
run quickstart 120 "$PY" -m papermill nbs/pipelines/quickstart.ipynb "$OUT/quickstart.ipynb" -p device "$DEV" \
  -p out_dir "$OUT/quickstart" "${QUICK[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]} (logs in $OUT/)"
  exit 1
fi
echo "all steps passed; results in $OUT/"
