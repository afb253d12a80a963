"""The package as a user installs it: no dependency on nbdev, nothing compiled at import, a missing extension
falls back to the reference with one warning, and the C++ op itself names bad arguments."""
import subprocess
import sys
import textwrap
from configparser import ConfigParser
from pathlib import Path

import pytest
import torch

from deepfusion_ref import ops

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT)


def test_runtime_requirements_exclude_dev_tools():
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    requirements = cfg["DEFAULT"]["requirements"].lower()
    for tool in ("nbdev", "fastcore", "execnb", "papermill", "pytest"):
        assert tool not in requirements


def test_import_pulls_in_no_dev_tools_and_compiles_nothing():
    result = run_python("""
        import sys
        import deepfusion_ref.schedules, deepfusion_ref.text, deepfusion_ref.thresholding
        # transformers is imported only when a language model is loaded, keeping `import deepfusion_ref` light
        bad = [m for m in ("nbdev", "fastcore", "execnb", "torch.utils.cpp_extension", "transformers")
               if m in sys.modules]
        print(bad)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_missing_extension_falls_back_to_reference_with_one_warning():
    result = run_python("""
        import sys, warnings
        sys.modules["deepfusion_ref._C"] = None  # makes `import deepfusion_ref._C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from deepfusion_ref import ops
            from deepfusion_ref.thresholding import dynamic_threshold
            x = torch.randn(3, 1000) * 3
            y = dynamic_threshold(x)
            y = dynamic_threshold(x)
        ours = [w for w in caught if "deepfusion_ref" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert not ops.kernel_available("dynamic_threshold", "cpu")
        assert torch.equal(y, ops.dynamic_threshold_reference(x)[0])
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.skipif(not ops.load_extension(), reason="compiled extension not built")
@pytest.mark.parametrize("args, name", [((0.995, 0.5), "max_value"), ((1.5, None), "percentile"),
                                        ((-0.5, None), "percentile")])
def test_compiled_op_names_bad_arguments(args, name):
    with pytest.raises(RuntimeError, match=name):
        torch.ops.deepfusion_ref.dynamic_threshold(torch.randn(2, 3), *args)


@pytest.mark.skipif(not ops.load_extension(), reason="compiled extension not built")
def test_compiled_op_rejects_non_float_and_scalar_input():
    with pytest.raises(RuntimeError, match="floating"):
        torch.ops.deepfusion_ref.dynamic_threshold(torch.ones(2, 3, dtype=torch.int32), 0.9, None)
    with pytest.raises(RuntimeError, match="batch"):
        torch.ops.deepfusion_ref.dynamic_threshold(torch.tensor(2.0), 0.9, None)
