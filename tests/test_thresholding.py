"""Dynamic and static thresholding: the compiled kernels and the reference against an independent float64 NumPy
computation (np.quantile, method='linear'), plus gradients, registration, tracing, dispatch and bad input."""
import numpy as np
import pytest
import torch

from deepfusion_ref import ops
from deepfusion_ref.thresholding import apply_threshold, dynamic_threshold, static_threshold

HAS_EXT = ops.load_extension()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="compiled extension not built")
IMPLS = ["reference", pytest.param("extension", marks=needs_ext)]


def numpy_threshold(x: torch.Tensor, percentile=0.995, max_value=None):
    "The oracle: float64 NumPy, written independently of the package."
    a = x.detach().cpu().double().numpy().reshape(x.shape[0], -1)
    s = np.maximum(np.quantile(np.abs(a), percentile, axis=1, method="linear"), 1.0)
    if max_value is not None:
        s = np.minimum(s, max_value)
    y = np.clip(a, -s[:, None], s[:, None]) / s[:, None]
    return y.reshape(tuple(x.shape)), s


def assert_matches_oracle(x, percentile=0.995, max_value=None, impl="auto"):
    y, s = dynamic_threshold(x, percentile, max_value, return_scale=True, impl=impl)
    y_np, s_np = numpy_threshold(x, percentile, max_value)
    assert y.shape == x.shape and y.dtype == x.dtype and s.dtype == torch.float32
    np.testing.assert_allclose(s.cpu().double().numpy(), s_np, rtol=1e-6)
    if x.dtype in (torch.float32, torch.float64):
        np.testing.assert_allclose(y.cpu().double().numpy(), y_np, rtol=1e-6, atol=1e-7)
    else:  # y is rounded to x's dtype: compare with the oracle rounded the same way
        torch.testing.assert_close(y.cpu(), torch.from_numpy(y_np).to(x.dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_batches_both_cpu_strategies(impl, batch, num_threads, threads):
    # 3x151x150 = 67950 elements per sample: with fewer samples than threads the CPU kernel splits each sample
    # over threads (histogram selection in parallel), otherwise it gives one sample to each thread.
    threads(num_threads)
    x = torch.randn(batch, 3, 151, 150, generator=torch.Generator().manual_seed(batch)) * 2.5
    assert_matches_oracle(x, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (3, 7), (4,), (5, 3, 5, 7), (2, 3, 255, 257)])
@pytest.mark.parametrize("percentile", [0.0, 0.5, 0.9, 0.995, 1.0])
def test_odd_sizes_and_percentiles(impl, shape, percentile):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 3
    assert_matches_oracle(x, percentile, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("max_value", [1.0, 1.7, 100.0])
def test_max_value_caps_the_scale(impl, max_value):
    x = torch.randn(4, 2, 30, 30) * 4
    assert_matches_oracle(x, 0.99, max_value, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_threads", [1, 2])
def test_ties(impl, num_threads, threads):
    threads(num_threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-6, 7, (3, 2, 200, 200), generator=g).float()  # 13 distinct values, heavy ties
    x[1] = 3.0  # one sample entirely equal
    for p in (0.5, 0.9, 0.995, 0.999):
        assert_matches_oracle(x, p, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_identity_when_in_range(impl):
    x = torch.rand(6, 3, 33, 33) * 1.98 - 0.99
    y, s = dynamic_threshold(x, return_scale=True, impl=impl)
    assert torch.equal(y, x) and torch.equal(s, torch.ones(6))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(impl, dtype):
    x = (torch.randn(4, 3, 64, 65) * 3).to(dtype)
    assert_matches_oracle(x, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_input(impl):
    base = torch.randn(3, 4, 20, 24) * 3
    for x in (base.to(memory_format=torch.channels_last), base.transpose(2, 3), base[:, :, ::2]):
        assert_matches_oracle(x, impl=impl)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_more_than_2_pow_24_elements_per_sample(impl, threads):
    # torch.quantile refuses inputs this large; selection does not care.
    threads(2)
    n = 2**24 + 7
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(1)) * 2
    with pytest.raises(RuntimeError):
        torch.quantile(x.abs(), 0.995, dim=1)
    assert_matches_oracle(x, impl=impl)


@needs_ext
def test_nan_handling_matches_reference():
    x = torch.randn(2, 1000) * 3
    x[0, 17] = float("nan")
    y_ext, s_ext = dynamic_threshold(x, return_scale=True, impl="extension")
    y_ref, s_ref = dynamic_threshold(x, return_scale=True, impl="reference")
    torch.testing.assert_close(s_ext, s_ref, equal_nan=True)
    torch.testing.assert_close(y_ext, y_ref, equal_nan=True)
    assert torch.isnan(y_ext[0, 17]) and torch.isfinite(y_ext[1]).all()


def test_static_threshold_and_apply_threshold():
    x = torch.randn(3, 50) * 3
    assert torch.equal(static_threshold(x), torch.clamp(x, -1, 1))
    assert apply_threshold(x, None) is x and apply_threshold(x, "none") is x
    assert torch.equal(apply_threshold(x, "static"), static_threshold(x))
    assert torch.equal(apply_threshold(x, "dynamic", 0.9), dynamic_threshold(x, 0.9))
    with pytest.raises(ValueError, match="method"):
        apply_threshold(x, "dynamc")


def test_equals_static_when_scale_is_one():
    x = torch.randn(4, 500) * 3
    assert torch.equal(dynamic_threshold(x, percentile=0.0), static_threshold(x))


def test_empty_batch():
    y, s = dynamic_threshold(torch.empty(0, 3, 4), return_scale=True)
    assert y.shape == (0, 3, 4) and s.shape == (0,)


@pytest.mark.parametrize("kwargs, name", [
    (dict(percentile=1.5), "percentile"), (dict(percentile=-0.1), "percentile"), (dict(percentile="0.9"), "percentile"),
    (dict(percentile=True), "percentile"), (dict(max_value=0.5), "max_value"), (dict(max_value="2"), "max_value"),
    (dict(impl="fastest"), "impl"),
])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dynamic_threshold(torch.randn(2, 5), **kwargs)


def test_bad_x0_is_named():
    with pytest.raises(TypeError, match="x0"):
        dynamic_threshold(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="x0"):
        dynamic_threshold(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x0"):
        dynamic_threshold(torch.tensor(3.0))
    with pytest.raises(ValueError, match="x0"):
        dynamic_threshold(torch.zeros(2, 0))


# --- gradients -------------------------------------------------------------------------------------------


def _grads(x, impl, percentile, max_value):
    x = x.detach().clone().requires_grad_()
    y, s = dynamic_threshold(x, percentile, max_value, return_scale=True, impl=impl)
    g = torch.Generator().manual_seed(3)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (s * torch.randn(s.shape, generator=g)).sum()
    return torch.autograd.grad(loss, x)[0]


@needs_ext
@pytest.mark.parametrize("percentile, max_value", [(0.9, None), (0.995, None), (0.8, 1.5), (0.5, None)])
def test_kernel_gradient_equals_autograd_through_reference(percentile, max_value):
    # One sample inside [-1, 1] (the clamp at 1 binds), others well outside it.
    x = torch.randn(3, 2, 9, 11, dtype=torch.float64) * torch.tensor([0.2, 3.0, 6.0], dtype=torch.float64)[:, None, None, None]
    torch.testing.assert_close(_grads(x, "extension", percentile, max_value),
                               _grads(x, "reference", percentile, max_value), rtol=1e-10, atol=1e-12)


@needs_ext
def test_gradcheck_kernel():
    # y only: s is returned in float32 whatever x's dtype, too coarse for finite differences (its gradient is
    # covered by the comparison with autograd through the reference above).
    x = (torch.randn(2, 40, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: dynamic_threshold(t, 0.9, impl="extension"), (x,))


# --- registration, tracing and dispatch ---------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(dtype):
    x = (torch.randn(3, 4, 9, 7) * 3).to(dtype)
    op = torch.ops.deepfusion_ref.dynamic_threshold.default
    torch.library.opcheck(op, (x.requires_grad_(dtype != torch.bfloat16), 0.99, None))
    torch.library.opcheck(op, (x.detach(), 0.9, 2.0))


@pytest.mark.parametrize("impl", ["auto"] + IMPLS)
def test_torch_compile_full_graph(impl):
    def sample_step(x):
        return dynamic_threshold(x * 2.0, 0.99, impl=impl) - 0.5

    x = torch.randn(4, 3, 16, 16) * 2
    compiled = torch.compile(sample_step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), sample_step(x))


def test_force_reference_by_environment(monkeypatch):
    calls = []
    reference = ops.dynamic_threshold_reference
    monkeypatch.setattr(ops, "dynamic_threshold_reference", lambda *a: calls.append(1) or reference(*a))
    x = torch.randn(2, 100) * 3
    monkeypatch.setenv(ops.FORCE_REFERENCE_ENV, "1")
    dynamic_threshold(x)
    assert calls == [1]
    monkeypatch.setenv(ops.FORCE_REFERENCE_ENV, "0")
    dynamic_threshold(x)
    assert calls == ([1] if HAS_EXT else [1, 1])


def test_dispatch_falls_back_for_unsupported_dtype_and_insists_when_asked():
    x = torch.randn(2, 3)
    assert ops.use_extension("dynamic_threshold", x, "auto", dtypes=(torch.float16,)) is False
    with pytest.raises(RuntimeError, match="no compiled"):
        ops.use_extension("dynamic_threshold", x, "extension", dtypes=(torch.float16,))
    with pytest.raises(ValueError, match="impl"):
        ops.use_extension("dynamic_threshold", x, "fast")


def test_missing_extension_warns_once():
    with pytest.warns(RuntimeWarning, match="could not be loaded") as record:
        assert ops.load_extension("deepfusion_ref._missing_for_test") is False
        assert ops.load_extension("deepfusion_ref._missing_for_test") is False
    assert len(record) == 1


# --- CUDA ----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 3, 64, 64), (1, 3, 256, 256), (4, 3, 255, 257)])
def test_cuda_matches_oracle(dtype, shape):
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    for p in (0.0, 0.5, 0.995, 1.0):
        assert_matches_oracle(x, p, impl="extension")


@pytest.mark.cuda
def test_cuda_ties_and_constant_samples():
    x = torch.randint(-6, 7, (3, 2, 200, 200), device="cuda").float()
    x[1] = 3.0
    for p in (0.5, 0.9, 0.995, 0.999, 1.0):
        assert_matches_oracle(x, p, impl="extension")


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_more_than_2_pow_24_elements_per_sample():
    x = torch.randn(2, 2**24 + 7, device="cuda") * 2
    assert_matches_oracle(x, impl="extension")


@pytest.mark.cuda
def test_cuda_equals_cpu_kernel_and_opcheck():
    x = torch.randn(5, 3, 40, 41) * 3
    y_cpu, s_cpu = dynamic_threshold(x, return_scale=True, impl="extension")
    y_gpu, s_gpu = dynamic_threshold(x.cuda(), return_scale=True, impl="extension")
    torch.testing.assert_close(s_gpu.cpu(), s_cpu)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu)
    torch.library.opcheck(torch.ops.deepfusion_ref.dynamic_threshold.default, (x.cuda(), 0.99, None))
