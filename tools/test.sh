#!/usr/bin/env bash
# Everything CI checks, in order (run by `make test` after tools/install.sh):
#   1. notebooks, package and README agree: nbdev_export, nbdev_clean and tools/readme.py change nothing;
#   2. every CUDA source compiles with nvcc (nothing runs without a GPU);
#   3. pytest on tests/ (CUDA tests run only where a GPU is present; the nbs/pipelines/ experiments run there under
#      papermill with their CPU-small parameters);
#   4. nbdev_test on nbs/ (every component notebook executed top to bottom; `#| cuda` cells on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BIN=$VENV/bin
export PATH="$PWD/$BIN:$PATH" PYTHONWARNINGS="ignore:pkg_resources is deprecated"
step() { printf '\n=== %s\n' "$*"; }

step "notebooks <-> package <-> README in sync"
snapshot() { { git status --porcelain --untracked-files=all; git diff; } | md5sum; }
before=$(snapshot)
nbdev_export
nbdev_clean
python tools/readme.py
if [ "$(snapshot)" != "$before" ] || { [ "${CI:-}" = true ] && [ -n "$(git status --porcelain --untracked-files=all)" ]; }; then
  git status --short
  echo "FAIL: nbdev_export / nbdev_clean / tools/readme.py changed the tree: export and clean the notebooks" \
       "and commit notebooks, package and README together." >&2
  exit 1
fi
echo "in sync"

step "CUDA sources compile"
PYTHON=$BIN/python bash tools/check_cuda.sh

step "pytest tests/"
python -m pytest tests -q -p no:cacheprovider

step "nbdev_test nbs/"
# Cells flagged `#| cuda` run only where a GPU is present.
flags=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else '')")
# nbs/pipelines/ is skipped here: tests/test_pipeline_notebooks.py runs those notebooks under papermill.
nbdev_test --path nbs --flags "$flags" --do_print --timing --skip_folder_re "^([_.]|pipelines$)"
