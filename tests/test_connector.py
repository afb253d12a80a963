"""layer_map strategies on hand-worked cases and invariants; Connector shapes, parameters and algebra."""
import pytest
import torch

from deepfusion_ref.connector import STRATEGIES, Connector, layer_map


@pytest.mark.parametrize("args, expected", [
    ((5, 3, "uniform"), [0, 2, 4]),
    ((12, 4, "uniform"), [0, 4, 7, 11]),  # 0, 3.67, 7.33, 11 rounded half up
    ((2, 5, "uniform"), [0, 0, 1, 1, 1]),  # 0, .25, .5, .75, 1
    ((7, 1, "uniform"), [6]),
    ((4, 4, "one_to_one"), [0, 1, 2, 3]),
    ((3, 5, "repeat_last"), [0, 1, 2, 2, 2]),
    ((6, 3, "repeat_last"), [0, 1, 2]),
])
def test_hand_worked_maps(args, expected):
    assert layer_map(*args) == expected


def test_offset_skips_the_first_layers():
    assert layer_map(32, 24, "offset", offset=8) == list(range(8, 32))
    assert layer_map(10, 4, "offset", offset=3) == [3, 4, 5, 6]


@pytest.mark.parametrize("L", [1, 2, 5, 12, 32])
@pytest.mark.parametrize("N", [1, 3, 8, 40])
def test_uniform_is_monotone_in_range_and_hits_both_ends(L, N):
    m = layer_map(L, N)
    assert len(m) == N and all(0 <= i < L for i in m) and m == sorted(m) and m[-1] == L - 1
    if N > 1:
        assert m[0] == 0
    if N >= L:
        assert set(m) == set(range(L))  # every layer is used when there are enough blocks


@pytest.mark.parametrize("call, name", [
    (lambda: layer_map(4, 5, "one_to_one"), "one_to_one"),
    (lambda: layer_map(10, 8, "offset", offset=3), "offset"),
    (lambda: layer_map(10, 8, "spread"), "strategy"),
    (lambda: layer_map(0, 8), "num_llm_layers"),
    (lambda: layer_map(8, 0), "num_blocks"),
    (lambda: layer_map(8, 2, "offset", offset=-1), "offset"),
])
def test_impossible_maps_are_named(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_every_strategy_is_listed():
    assert set(STRATEGIES) == {"one_to_one", "uniform", "offset", "repeat_last"}


def test_linear_connector_is_x_w_plus_b():
    c = Connector(6, 4)
    x = torch.randn(2, 5, 6)
    lin = c.branches[0][1]
    torch.testing.assert_close(c(x), x @ lin.weight.T + lin.bias)


def test_shapes_and_parameter_counts():
    shared = Connector(16, 8, num_layers=3, kind="mlp")
    per = Connector(16, 8, num_layers=3, kind="mlp", shared=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(per) == 3 * count(shared)
    x = torch.randn(3, 2, 5, 16)
    assert shared(x).shape == per(x).shape == (3, 2, 5, 8)
    assert shared(x[0]).shape == (2, 5, 8)


def test_per_layer_branches_differ_and_shared_ones_do_not():
    torch.manual_seed(0)
    same = torch.randn(1, 2, 5, 16).expand(3, 2, 5, 16)
    per = Connector(16, 8, num_layers=3, shared=False)(same)
    shared = Connector(16, 8, num_layers=3)(same)
    assert not torch.allclose(per[0], per[1]) and torch.equal(shared[0], shared[1])


def test_rms_norm_makes_the_output_scale_free():
    c = Connector(32, 8, num_layers=2, shared=False, norm=True, kind="mlp")
    x = torch.randn(2, 3, 4, 32)
    torch.testing.assert_close(c(x * 37.0), c(x), atol=1e-5, rtol=1e-5)
    plain = Connector(32, 8)
    assert not torch.allclose(plain(x[0] * 37.0), plain(x[0]))


def test_bad_shapes_are_named():
    c = Connector(16, 8, num_layers=3, shared=False)
    with pytest.raises(ValueError, match="hidden"):
        c(torch.randn(3, 2, 5, 15))
    with pytest.raises(ValueError, match="hidden"):
        c(torch.randn(2, 5, 16))  # per-layer connector given a single layer
    with pytest.raises(ValueError, match="hidden"):
        c(torch.randn(4, 2, 5, 16))
    with pytest.raises(ValueError, match="kind"):
        Connector(4, 4, kind="conv")
