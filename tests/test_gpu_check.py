"""The prepared GPU run (tools/gpu_check.sh) as a CPU dry run: every step (tests, op, DiT and U-Net benchmarks, the
quickstart pipeline) runs at tiny sizes and writes what the GPU run would, so that run cannot fail on a typo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepfusion_ref import ops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not ops.load_extension(), reason="compiled extension not built")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "all steps passed" in done.stdout
    for dtype in ("float32", "bfloat16"):
        rows = json.loads((tmp_path / f"ops_{dtype}.json").read_text())["rows"]
        assert {r["op"] for r in rows} >= {"dynamic_threshold", "adaln_norm", "rope", "group_norm_silu"}
    dit = json.loads((tmp_path / "dit.json").read_text())
    assert {r["model"] for r in dit["rows"]} >= {"ours", "flux depth 2", "sana depth 2"}
    assert all(r["ms"]["median"] > 0 for r in dit["rows"])
    unet = json.loads((tmp_path / "unet.json").read_text())
    assert set(unet["rows"][0]["ratios"]) == {"standard", "diffusers"}
    metrics = json.loads((tmp_path / "quickstart" / "metrics.json").read_text())
    assert metrics  # the pipeline ran to its end
    assert torch.ops.deepfusion_ref.cpu_isa() in (tmp_path / "ops_float32.log").read_text()
