"""The fused GroupNorm + FiLM + SiLU op: compiled kernels against the reference (torch's own group_norm, then
the modulation, then silu), forward and backward, in both layouts; opcheck; torch.compile; argument errors;
and the CUDA kernel where a GPU exists."""
import pytest
import torch

from deepfusion_ref import ops

needs_op = pytest.mark.skipif(not (ops.load_extension() and hasattr(torch.ops.deepfusion_ref, "group_norm_silu")),
                              reason="compiled extension with group_norm_silu not built")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_args(shape, groups, dtype, device="cpu", channels_last=False, affine=True, film=True, seed=0):
    "x (times 2, plus 1: a mean the variance must survive) and the optional parameters, all requiring grad."
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    x = x.to(dtype=dtype, device=device)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # channels_last / channels_last_3d / [N, L, C] alike
    params = [torch.randn(size, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) if on else None
              for size, on in (((c,), affine), ((c,), affine), ((n, c), film), ((n, c), film))]
    return [t if t is None else t.requires_grad_() for t in (x, *params)]


def check(shape, groups, dtype, device="cpu", act=True, **kw):
    x, w, b, s, t = args = make_args(shape, groups, dtype, device, **kw)
    out = ops.group_norm_silu(x, w, b, groups, s, t, act=act, impl="extension")
    ref = ops.group_norm_silu(x, w, b, groups, s, t, act=act, impl="reference")
    assert out.dtype == x.dtype and out.shape == x.shape and out.stride() == ops._empty_like_layout(x).stride()
    if kw.get("channels_last") and shape[1] > 1 and out[0, 0].numel() > 1:
        assert not out.is_contiguous() and out.movedim(1, -1).is_contiguous()  # kept x's layout
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=tol * 4, rtol=tol)
    given = [a for a in args if a is not None]
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, given, g), torch.autograd.grad(ref, given, g)):
        # gradients are sums over up to N * H * W terms, and grad_x is a difference of such sums
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, atol=tol * 20 * scale, rtol=tol * 10)


SHAPES = [((2, 6, 5, 7), 3), ((3, 4, 1, 1), 2), ((2, 32, 9, 16), 8), ((1, 8, 33), 4), ((2, 4, 3, 4, 5), 1)]


@needs_op
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernel_matches_reference(shape, groups, dtype, channels_last):
    check(shape, groups, dtype, channels_last=channels_last)


@needs_op
@pytest.mark.parametrize("affine,film,act", [(False, False, True), (True, False, False), (False, True, True),
                                             (True, True, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_optional_parts(affine, film, act, channels_last):
    check((2, 12, 6, 5), 4, torch.float32, affine=affine, film=film, act=act, channels_last=channels_last)
    check((2, 12, 6, 5), 4, torch.float64, affine=affine, film=film, act=act, channels_last=channels_last)


@needs_op
def test_half_and_large_mean():
    check((2, 16, 8, 8), 4, torch.float16, channels_last=True)
    # a mean 1000x the spread: the statistics must not cancel the variance away
    x = torch.randn(2, 8, 32, 32) * 0.01 + 10.0
    torch.testing.assert_close(ops.group_norm_silu(x, None, None, 2, impl="extension"),
                               ops.group_norm_silu(x.double(), None, None, 2, impl="reference").float(),
                               atol=1e-4, rtol=1e-4)


@needs_op
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    for affine, film in ((True, True), (False, False)):
        x, *params = make_args((2, 6, 4, 5), 3, torch.float32, channels_last=channels_last, affine=affine, film=film)
        torch.library.opcheck(torch.ops.deepfusion_ref.group_norm_silu.default, (x, *params, 3, 1e-5, True))
        # the backward op itself is not differentiable (no double backward): schema and fake checks only
        x, *params = (None if a is None else a.detach() for a in (x, *params))
        y, mean, rstd = torch.ops.deepfusion_ref.group_norm_silu(x, *params, 3, 1e-5, True)
        torch.library.opcheck(torch.ops.deepfusion_ref.group_norm_silu_backward.default,
                              (torch.randn_like(y), x, mean, rstd, *params, 3, True),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@needs_op
def test_torch_compile_fullgraph():
    x, w, b, s, t = make_args((2, 8, 6, 6), 4, torch.float32, channels_last=True)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def block(x, w, b, s, t):
        return conv(ops.group_norm_silu(x, w, b, 4, s, t)) + x

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out, eager = compiled(x, w, b, s, t), block(x, w, b, s, t)
    torch.testing.assert_close(out, eager)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (x, w, b, s, t), g), torch.autograd.grad(eager, (x, w, b, s, t), g)):
        torch.testing.assert_close(a, e)


def test_bad_arguments_are_named():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="num_groups"):
        ops.group_norm_silu(x, None, None, 4)
    with pytest.raises(ValueError, match="weight"):
        ops.group_norm_silu(x, torch.ones(5), None, 3)
    with pytest.raises(ValueError, match="bias"):
        ops.group_norm_silu(x, None, torch.ones(2, 6), 3)
    with pytest.raises(ValueError, match="scale"):
        ops.group_norm_silu(x, None, None, 3, scale=torch.ones(6))
    with pytest.raises(ValueError, match="shift"):
        ops.group_norm_silu(x, None, None, 3, shift=torch.ones(3, 6))
    with pytest.raises(ValueError, match="spatial"):
        ops.group_norm_silu(torch.randn(2, 6), None, None, 3)
    with pytest.raises(ValueError, match="impl"):
        ops.group_norm_silu(x, None, None, 3, impl="fast")


def test_reference_is_group_norm_module_then_film_then_silu():
    x, w, b, s, t = (a.detach() for a in make_args((2, 6, 5, 3), 3, torch.float64))
    gn = torch.nn.GroupNorm(3, 6).double()
    with torch.no_grad():
        gn.weight.copy_(w), gn.bias.copy_(b)
    expected = torch.nn.functional.silu(gn(x) * (1 + s[..., None, None]) + t[..., None, None])
    torch.testing.assert_close(ops.group_norm_silu_reference(x, w, b, 3, s, t), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_kernel_matches_reference(dtype, channels_last):
    for shape, groups in SHAPES + [((4, 256, 64, 64), 32), ((2, 64, 17, 300), 32)]:
        check(shape, groups, dtype, device="cuda", channels_last=channels_last)
    for affine, film, act in ((False, False, True), (True, False, False), (False, True, True)):
        check((2, 12, 6, 5), 4, dtype, device="cuda", affine=affine, film=film, act=act, channels_last=channels_last)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    x, *params = make_args((2, 6, 4, 5), 3, torch.float32, device="cuda", channels_last=True)
    torch.library.opcheck(torch.ops.deepfusion_ref.group_norm_silu.default, (x, *params, 3, 1e-5, True))
    compiled = torch.compile(lambda x: ops.group_norm_silu(x, *params[:2], 3, *params[2:]), fullgraph=True)
    torch.testing.assert_close(compiled(x), ops.group_norm_silu_reference(x, *params[:2], 3, *params[2:]),
                               atol=1e-5, rtol=1e-5)
