#!/usr/bin/env bash
# Compile every CUDA source with nvcc and syntax-check the C++ bindings of the CUDA kernels, so CUDA code cannot
# rot on machines without a GPU. Nothing is run. With REQUIRE_NVCC=1 (CI) a missing nvcc is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NVCC=${NVCC:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc; } || true
if [ -z "$NVCC" ]; then
  if [ "${REQUIRE_NVCC:-0}" = 1 ]; then echo "check_cuda: nvcc not found" >&2; exit 1; fi
  echo "check_cuda: nvcc not found, skipped"; exit 0
fi
# The toolkit root, from nvcc itself (the nvcc on PATH may be a wrapper script).
CUDA_ROOT=$("$NVCC" -v -x cu -E /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
[ -d "$CUDA_ROOT/include" ] || CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
# The same architectures setup.py builds by default (A100, H100).
arch="-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90"
for cu in csrc/cuda/*.cu; do
  echo "check_cuda: nvcc $cu"
  "$NVCC" -std=c++17 -O3 $arch -Icsrc/cuda -Xcompiler -fPIC -Werror all-warnings -c "$cu" -o "$out/$(basename "$cu").o"
done
# Bindings: torch's headers from the installed (possibly CPU-only) torch. A CPU wheel lacks the generated
# c10/cuda/impl/cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE tells c10 to skip.
mapfile -t torch_inc < <("$PYTHON" -c "import sysconfig, torch.utils.cpp_extension as c; print('\n'.join(c.include_paths() + [sysconfig.get_paths()['include']]))")
for cpp in csrc/cuda/*.cpp; do
  [ -e "$cpp" ] || continue
  echo "check_cuda: syntax of $cpp"
  g++ -std=c++20 -fsyntax-only -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "${torch_inc[@]/#/-I}" -I"$CUDA_ROOT/include" -Icsrc/cuda "$cpp"
done
echo "check_cuda: ok"
