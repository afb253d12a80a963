"""layer_map strategies on hand-worked cases and invariants; gather_layers; Connector shapes, parameters and algebra."""
import math

import pytest
import torch

from deepfusion_ref.connector import STRATEGIES, Connector, gather_layers, layer_map

PAIRS = [(L, N) for L in (1, 2, 3, 5, 8, 12, 24, 32, 40) for N in (1, 2, 3, 7, 8, 12, 19, 32, 57)]


# --- layer_map: exact outputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    ((5, 3, "uniform"), [0, 2, 4]),
    ((12, 4, "uniform"), [0, 4, 7, 11]),  # 0, 3.67, 7.33, 11
    ((12, 8, "uniform"), [0, 2, 3, 5, 6, 8, 9, 11]),  # 0, 1.57, 3.14, 4.71, 6.29, 7.86, 9.43, 11
    ((2, 5, "uniform"), [0, 0, 1, 1, 1]),  # 0, .25, .5, .75, 1: .5 rounds up
    ((3, 5, "uniform"), [0, 1, 1, 2, 2]),  # 0, .5, 1, 1.5, 2: half up, not banker's rounding (which gives 0,0,1,2,2)
    ((6, 10, "uniform"), [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]),
    ((7, 1, "uniform"), [6]),  # a single block reads the last layer
    ((1, 4, "uniform"), [0, 0, 0, 0]),
    ((4, 4, "one_to_one"), [0, 1, 2, 3]),
    ((1, 1, "one_to_one"), [0]),
    ((3, 5, "repeat_last"), [0, 1, 2, 2, 2]),
    ((6, 3, "repeat_last"), [0, 1, 2]),
    ((1, 3, "repeat_last"), [0, 0, 0]),
])
def test_hand_worked_maps(args, expected):
    assert layer_map(*args) == expected


def test_default_strategy_is_uniform():
    assert layer_map(12, 8) == layer_map(12, 8, "uniform")


def test_offset_skips_the_first_layers():
    assert layer_map(32, 24, "offset", offset=8) == list(range(8, 32))
    assert layer_map(10, 4, "offset", offset=3) == [3, 4, 5, 6]
    assert layer_map(10, 4, "offset") == [0, 1, 2, 3]  # offset defaults to 0
    assert layer_map(6, 6, "offset", offset=0) == layer_map(6, 6, "one_to_one")


def test_offset_is_ignored_by_the_other_strategies():
    for strategy in ("uniform", "repeat_last"):
        assert layer_map(12, 5, strategy, offset=3) == layer_map(12, 5, strategy)


# --- layer_map: invariants over many depths ---------------------------------------------------------------------


@pytest.mark.parametrize("L, N", PAIRS)
def test_uniform_is_monotone_in_range_and_hits_both_ends(L, N):
    m = layer_map(L, N)
    assert len(m) == N and all(0 <= j < L for j in m) and m == sorted(m) and m[-1] == L - 1
    if N > 1:
        assert m[0] == 0
    if N >= L:
        assert set(m) == set(range(L))  # every layer is used when there are enough blocks
    else:
        assert len(set(m)) == N  # no layer is used twice when there are enough layers
    for i, j in enumerate(m):  # nearest to the ideal real position
        if N > 1:
            assert abs(j - i * (L - 1) / (N - 1)) <= 0.5


@pytest.mark.parametrize("L, N", PAIRS)
def test_repeat_last_follows_the_layers_then_repeats_the_last(L, N):
    m = layer_map(L, N, "repeat_last")
    assert len(m) == N and m == sorted(m) and all(0 <= j < L for j in m)
    assert m[:min(L, N)] == list(range(min(L, N)))
    assert m[L:] == [L - 1] * max(N - L, 0)


@pytest.mark.parametrize("L, N", [(L, N) for L, N in PAIRS if N <= L])
def test_offset_ends_at_offset_plus_blocks(L, N):
    for k in {0, (L - N) // 2, L - N}:
        m = layer_map(L, N, "offset", offset=k)
        assert m[0] == k and m[-1] == k + N - 1 and m == list(range(k, k + N)) and m[-1] < L


# --- layer_map: errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, pattern", [
    (lambda: layer_map(4, 5, "one_to_one"), r"one_to_one.*4 and 5.*uniform"),
    (lambda: layer_map(6, 5, "one_to_one"), r"num_llm_layers == num_blocks.*6 and 5"),
    (lambda: layer_map(10, 8, "offset", offset=3), r"offset=3.*offset <= 2"),
    (lambda: layer_map(6, 10, "offset"), r"offset.*no offset fits"),
    (lambda: layer_map(10, 8, "spread"), r"strategy.*'spread'"),
    (lambda: layer_map(0, 8), "num_llm_layers"),
    (lambda: layer_map(-3, 8), "num_llm_layers"),
    (lambda: layer_map(8, 0), "num_blocks"),
    (lambda: layer_map(8.0, 4), "num_llm_layers"),
    (lambda: layer_map(8, True), "num_blocks"),
    (lambda: layer_map(8, 2, "offset", offset=-1), "offset must be a non-negative int"),
    (lambda: layer_map(8, 2, "uniform", offset=-1), "offset must be a non-negative int"),
])
def test_impossible_maps_are_named(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_every_strategy_is_listed_and_accepted():
    assert set(STRATEGIES) == {"one_to_one", "uniform", "offset", "repeat_last"}
    for strategy in STRATEGIES:
        assert layer_map(4, 4, strategy) == [0, 1, 2, 3]


# --- gather_layers ----------------------------------------------------------------------------------------------


def test_gather_layers_selects_the_rows_of_the_map():
    hidden = torch.randn(6, 2, 3, 4)
    indices = layer_map(6, 10, "repeat_last")
    rows = gather_layers(hidden, indices)
    assert rows.shape == (10, 2, 3, 4)
    for i, j in enumerate(indices):
        assert torch.equal(rows[i], hidden[j])
    assert torch.equal(gather_layers(hidden, torch.tensor([5, 0])), hidden[[5, 0]])


@pytest.mark.parametrize("hidden, indices, pattern", [
    (torch.randn(6, 2, 3, 4), [0, 6], r"indices must be in \[0, 6\)"),
    (torch.randn(6, 2, 3, 4), [-1, 2], r"indices must be in \[0, 6\)"),
    (torch.randn(6, 2, 3, 4), [0.0, 1.0], "indices"),
    (torch.randn(6, 2, 3, 4), [[0, 1]], "indices"),
    (torch.randn(6, 2, 3, 4), [], "indices"),
    (torch.randn(2, 3, 4), [0], "hidden"),
])
def test_gather_layers_rejects_bad_input(hidden, indices, pattern):
    with pytest.raises(ValueError, match=pattern):
        gather_layers(hidden, indices)


# --- Connector --------------------------------------------------------------------------------------------------


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_qwen2vl_flux_connector_has_the_linear_layer_parameter_count():
    assert count(Connector(3584, 4096)) == 3584 * 4096 + 4096


def test_linear_connector_is_x_w_plus_b():
    torch.manual_seed(0)
    c = Connector(6, 4)
    x = torch.randn(2, 5, 6)
    lin = c.branches[0][1]
    torch.testing.assert_close(c(x), x @ lin.weight.T + lin.bias)


def test_mlp_connector_is_linear_gelu_tanh_linear():
    torch.manual_seed(0)
    c = Connector(6, 4, kind="mlp", mlp_ratio=2.0)
    first, second = c.branches[0][1], c.branches[0][3]
    assert first.weight.shape == (8, 6) and second.weight.shape == (4, 8)
    x = torch.randn(2, 5, 6)
    u = x @ first.weight.T + first.bias
    gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    torch.testing.assert_close(c(x), gelu @ second.weight.T + second.bias)


def test_shapes_for_a_single_layer_and_a_stack():
    for kind in ("linear", "mlp"):
        shared = Connector(16, 8, num_layers=3, kind=kind)
        per = Connector(16, 8, num_layers=3, kind=kind, shared=False)
        x = torch.randn(3, 2, 5, 16)
        assert shared(x).shape == per(x).shape == (3, 2, 5, 8)
        assert shared(x[0]).shape == (2, 5, 8)
        assert Connector(16, 8, shared=False, kind=kind)(x[0]).shape == (2, 5, 8)  # one layer, one branch


def test_shared_and_per_layer_parameter_counts():
    assert count(Connector(16, 8, num_layers=3)) == 16 * 8 + 8
    assert count(Connector(16, 8, num_layers=3, shared=False)) == 3 * (16 * 8 + 8)
    assert count(Connector(16, 8, num_layers=3, shared=False, norm=True)) == 3 * (16 * 8 + 8 + 16)  # + RMSNorm gain
    mlp = 16 * 32 + 32 + 32 * 8 + 8
    assert count(Connector(16, 8, num_layers=5, kind="mlp", mlp_ratio=4.0)) == mlp
    assert count(Connector(16, 8, num_layers=5, kind="mlp", mlp_ratio=4.0, shared=False)) == 5 * mlp


def test_per_layer_branches_differ_and_shared_ones_do_not():
    torch.manual_seed(0)
    same = torch.randn(1, 2, 5, 16).expand(3, 2, 5, 16)
    per_connector = Connector(16, 8, num_layers=3, shared=False)
    per, shared = per_connector(same), Connector(16, 8, num_layers=3)(same)
    assert not torch.allclose(per[0], per[1]) and not torch.allclose(per[1], per[2])
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])
    for i in range(3):  # layer i goes through branch i
        torch.testing.assert_close(per[i], per_connector.branches[i](same[i]))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("shared", [True, False])
def test_rms_norm_makes_the_output_scale_free(kind, shared):
    torch.manual_seed(0)
    c = Connector(32, 8, num_layers=2, shared=shared, norm=True, kind=kind)
    assert isinstance(c.branches[0][0], torch.nn.RMSNorm)
    x = torch.randn(2, 3, 4, 32)
    for scale in (0.5, 37.0, 1e4):  # exact up to RMSNorm's eps (float32 eps, ~1e-7, added to the mean square)
        torch.testing.assert_close(c(x * scale), c(x), atol=1e-5, rtol=1e-5)
    plain = Connector(32, 8, kind=kind)
    assert not torch.allclose(plain(x[0] * 37.0), plain(x[0]))


def test_bad_shapes_are_named():
    c = Connector(16, 8, num_layers=3, shared=False)
    with pytest.raises(ValueError, match="hidden: last dim must be in_dim=16"):
        c(torch.randn(3, 2, 5, 15))
    with pytest.raises(ValueError, match="hidden: a single layer"):
        c(torch.randn(2, 5, 16))  # per-layer connector given a single layer
    with pytest.raises(ValueError, match="hidden: expected"):
        c(torch.randn(4, 2, 5, 16))  # wrong number of layers
    with pytest.raises(ValueError, match="hidden: expected"):
        Connector(16, 8, num_layers=3)(torch.randn(2, 2, 5, 16))  # shared, but still the declared layer count
    with pytest.raises(ValueError, match="hidden"):
        c(torch.randn(5, 16))


@pytest.mark.parametrize("kwargs, name", [
    ({"in_dim": 4, "out_dim": 4, "kind": "conv"}, "kind"),
    ({"in_dim": 0, "out_dim": 4}, "in_dim"),
    ({"in_dim": 4, "out_dim": -1}, "out_dim"),
    ({"in_dim": 4, "out_dim": 4, "num_layers": 0}, "num_layers"),
    ({"in_dim": 4, "out_dim": 4, "kind": "mlp", "mlp_ratio": 0.0}, "mlp_ratio"),
])
def test_bad_construction_is_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Connector(**kwargs)
