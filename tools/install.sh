#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the package, its compiled core and the
# development tools. Used by `make demo` and `make test`; safe to run again.
#   tools/install.sh [PYTHON] [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
VENV=${2:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    # A GPU machine: reuse the CUDA build of torch that is already installed instead of downloading one.
    echo "install: CUDA torch found, creating $VENV with system site-packages"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "install: torch==2.13.0 (CPU build)"
  pip install "torch==2.13.0"
fi
echo "install: development requirements from settings.ini"
mapfile -t dev_reqs < <("$VENV/bin/python" - <<'PY'
from configparser import ConfigParser
cfg = ConfigParser(delimiters=["="]); cfg.read("settings.ini")
print("\n".join(cfg["DEFAULT"]["dev_requirements"].split()))
PY
)
pip install "${dev_reqs[@]}"
echo "install: deepfusion_ref (editable) and its compiled core"
pip install --no-build-isolation --no-deps -e .
# The package's own requirements (already satisfied by the steps above unless settings.ini grew).
mapfile -t reqs < <("$VENV/bin/python" - <<'PY'
from configparser import ConfigParser
cfg = ConfigParser(delimiters=["="]); cfg.read("settings.ini")
print("\n".join(cfg["DEFAULT"].get("requirements", "").split()))
PY
)
[ ${#reqs[@]} -eq 0 ] || pip install "${reqs[@]}"
"$VENV/bin/python" -c "from deepfusion_ref import ops; print('install: extension loaded:', ops.load_extension(), '| CUDA kernels:', ops.kernel_available('dynamic_threshold', 'cuda'))"
