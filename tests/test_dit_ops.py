"""The DiT's fused ops (adaLN normalisation, RoPE): compiled kernels against their references (which use
torch's own layer_norm / rms_norm) forward and backward, opcheck, and the CUDA kernels where a GPU exists."""
import pytest
import torch

from deepfusion_ref import ops

needs_ext = pytest.mark.skipif(not ops.load_extension(), reason="compiled extension not built")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def adaln_args(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    b, n, d = shape
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64) * 2 + 0.5
    shift, scale = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device).requires_grad_() for t in (x, shift, scale)]


def rope_args(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_()
    angles = torch.rand(shape[-2], shape[-1] // 2, generator=g, dtype=torch.float64) * 20
    cos = angles.cos().repeat_interleave(2, -1).float().to(device)
    sin = angles.sin().repeat_interleave(2, -1).float().to(device)
    return x, cos, sin


def check_adaln(shape, dtype, rms, device="cpu"):
    args = adaln_args(shape, dtype, device)
    out = ops.adaln_norm(*args, rms=rms, impl="extension")
    ref = ops.adaln_norm(*args, rms=rms, impl="reference")
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(ref, args, g)):
        torch.testing.assert_close(a, b, atol=tol * 10 * shape[1] ** 0.5, rtol=tol * 10)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 17, 40), (3, 64, 257)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True])
def test_adaln_norm_kernel_matches_reference(shape, dtype, rms):
    check_adaln(shape, dtype, rms)


def test_adaln_norm_reference_is_layer_norm_then_modulation():
    x, shift, scale = (t.detach() for t in adaln_args((2, 5, 12), torch.float64))
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    by_hand = (x - mean) / (var + 1e-6).sqrt() * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(ops.adaln_norm_reference(x, shift, scale), by_hand)
    rms_by_hand = x / (x.square().mean(-1, keepdim=True) + 1e-6).sqrt() * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(ops.adaln_norm_reference(x, shift, scale, rms=True), rms_by_hand)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 3, 17, 8), (2, 4, 64, 32)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_kernel_matches_reference_and_inverts(shape, dtype):
    x, cos, sin = rope_args(shape, dtype)
    out, ref = ops.rope(x, cos, sin, impl="extension"), ops.rope(x, cos, sin, impl="reference")
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    back = ops.rope(out.detach(), cos, -sin, impl="extension")  # rotating back recovers x
    inverse_tol = max(TOL[dtype] * 4, 1e-6)  # cos^2 + sin^2 = 1 only to float32 precision
    torch.testing.assert_close(back, x.detach(), atol=inverse_tol, rtol=inverse_tol)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               atol=TOL[dtype], rtol=TOL[dtype])


@needs_ext
def test_opcheck_dit_ops():
    for rms in (False, True):
        torch.library.opcheck(torch.ops.deepfusion_ref.adaln_norm.default,
                              (*adaln_args((2, 7, 16), torch.float32), 1e-6, rms))
    torch.library.opcheck(torch.ops.deepfusion_ref.rope.default, rope_args((2, 2, 9, 8), torch.float32))


def test_bad_arguments_are_named():
    x, shift, scale = (t.detach() for t in adaln_args((2, 5, 12), torch.float32))
    if ops.load_extension():
        with pytest.raises(RuntimeError, match="shift and scale"):
            torch.ops.deepfusion_ref.adaln_norm(x, shift[:, :5], scale, 1e-6, False)
        with pytest.raises(RuntimeError, match="cos and sin"):
            torch.ops.deepfusion_ref.rope(torch.randn(2, 5, 8), torch.ones(4, 8), torch.ones(4, 8))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True])
def test_cuda_adaln_norm(dtype, rms):
    for shape in [(1, 1, 8), (2, 17, 40), (4, 256, 1024)]:
        check_adaln(shape, dtype, rms, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_rope_equals_cpu(dtype):
    x, cos, sin = rope_args((2, 8, 300, 64), dtype)
    cpu = ops.rope(x.detach(), cos, sin, impl="extension")
    gpu = ops.rope(x.detach().cuda(), cos.cuda(), sin.cuda(), impl="extension")
    torch.testing.assert_close(gpu.cpu(), cpu, atol=TOL[dtype], rtol=TOL[dtype])
    torch.library.opcheck(torch.ops.deepfusion_ref.rope.default, tuple(t.cuda() for t in rope_args((2, 2, 9, 8),
                                                                                                   torch.float32)))
