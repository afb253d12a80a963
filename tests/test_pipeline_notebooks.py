"Every experiment notebook in nbs/pipelines/ runs under papermill with its CPU-small defaults and writes metrics.json."
import json
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")
NOTEBOOKS = sorted((Path(__file__).parents[1] / "nbs" / "pipelines").glob("*.ipynb"))


def parameters_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters' for papermill"
    return "".join(tagged[0]["source"])


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_under_papermill_and_writes_metrics(notebook, tmp_path, monkeypatch):
    # One intra-op thread in the kernel: the CPU-small models are too small for OpenMP to pay off, and a busy
    # second core would make its threads spin.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = parameters_cell(notebook)
    assert "out_dir" in params and "device" in params, f"{notebook.name}: parameters need out_dir and device"
    out_dir = tmp_path / "out"
    papermill.execute_notebook(str(notebook), str(tmp_path / notebook.name), parameters={"out_dir": str(out_dir)},
                               cwd=str(notebook.parent), progress_bar=False, kernel_name="python3")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics, f"{notebook.name}: metrics.json is empty"
    assert list(out_dir.glob("*.png")), f"{notebook.name}: wrote no figure"
