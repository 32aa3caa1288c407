"""The gradient engine and the random projection: vectorised gradients are the single-backward ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from simfluence.attribution import (
    GaussianProjection,
    last_layer,
    per_example_gradients,
    projected_gradients,
    select_parameters,
)
from simfluence.attribution.gradients import gradient_method, iter_per_example_gradients
from simfluence.errors import SimfluenceError


def cross_entropy(outputs, targets):
    return functional.cross_entropy(outputs, targets, reduction="none")


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    inputs = torch.randn(13, 5)
    targets = torch.randint(0, 3, (13,))
    return model, inputs, targets


def loop_gradients(model, inputs, targets, names=None):
    """One backward pass per example: the definition the vectorised engine must match."""
    chosen = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad()
        cross_entropy(model(x[None]), y[None]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for _, p in chosen]))
    return torch.stack(rows)


def test_vmap_gradients_equal_a_loop_of_single_backward_passes(tiny_mlp):
    model, inputs, targets = tiny_mlp
    model64 = model.double()
    expected = loop_gradients(model64, inputs.double(), targets)
    got = per_example_gradients(model64, cross_entropy, inputs.double(), targets, chunk_size=4)
    assert got.shape == (13, 5 * 7 + 7 + 7 * 3 + 3)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_parameter_subset_keeps_only_its_columns(tiny_mlp):
    model, inputs, targets = tiny_mlp
    names = last_layer(model)
    assert names == ["2.weight", "2.bias"]
    full = per_example_gradients(model, cross_entropy, inputs, targets, dtype=torch.float64)
    last = per_example_gradients(model, cross_entropy, inputs, targets, params=names, dtype=torch.float64)
    by_predicate = per_example_gradients(model, cross_entropy, inputs, targets, dtype=torch.float64,
                                         params=lambda name, _: name.startswith("2."))
    assert torch.allclose(last, full[:, -(7 * 3 + 3):], atol=1e-12)
    assert torch.equal(last, by_predicate)
    assert torch.allclose(last, loop_gradients(model.double(), inputs.double(), targets, names), atol=1e-6)


def test_chunking_does_not_change_gradients(tiny_mlp):
    model, inputs, targets = tiny_mlp
    one = per_example_gradients(model, cross_entropy, inputs, targets, chunk_size=1, as_numpy=True)
    all_at_once = per_example_gradients(model, cross_entropy, inputs, targets, chunk_size=100, as_numpy=True)
    assert isinstance(one, np.ndarray)
    np.testing.assert_allclose(one, all_at_once, atol=1e-6)


def test_unknown_parameter_name_is_a_clear_error(tiny_mlp):
    model, _, _ = tiny_mlp
    with pytest.raises(SimfluenceError, match="no parameter 'head.weight'"):
        select_parameters(model, ["head.weight"])


def test_projection_preserves_inner_products_within_jl_error():
    generator = torch.Generator().manual_seed(1)
    n_params, dim = 3000, 512
    vectors = torch.randn(20, n_params, generator=generator, dtype=torch.float64)
    vectors[10:] += vectors[:10]  # correlated pairs, so some inner products are far from zero
    projection = GaussianProjection(n_params, dim, seed=7, page_rows=700)
    projected = projection(vectors)
    exact = vectors @ vectors.T
    norms = vectors.norm(dim=1)
    error = (projected @ projected.T - exact) / (norms[:, None] * norms[None, :])
    # each entry has standard deviation <= sqrt(2 / dim); 4.5 sigma over 210 entries never fails by chance
    assert error.abs().max() < 4.5 * np.sqrt(2 / dim)
    assert abs(float(error.diagonal().mean())) < 3 * np.sqrt(2 / dim / 20)  # unbiased


def test_projection_is_the_same_however_inputs_are_chunked():
    vectors = torch.randn(6, 2500, generator=torch.Generator().manual_seed(2))
    projection = GaussianProjection(2500, 64, seed=3, page_rows=1000)
    whole = projection(vectors)
    by_columns = projection(vectors[:, :1234]) + projection(vectors[:, 1234:], offset=1234)
    by_rows = torch.cat([projection(vectors[:2]), projection(vectors[2:])])
    assert torch.allclose(whole, by_columns, rtol=1e-5, atol=1e-5)  # float32 sums in another order
    assert torch.allclose(whole, by_rows, rtol=1e-5, atol=1e-5)
    assert torch.equal(GaussianProjection(2500, 64, seed=3, page_rows=1000)(vectors), whole)
    assert not torch.allclose(GaussianProjection(2500, 64, seed=4, page_rows=1000)(vectors), whole)


def test_projected_gradients_equal_projecting_the_full_gradients(tiny_mlp):
    model, inputs, targets = tiny_mlp
    full = per_example_gradients(model, cross_entropy, inputs, targets)
    projection = GaussianProjection(full.shape[1], 16, seed=0, page_rows=10)
    streamed = projected_gradients(model, cross_entropy, inputs, targets, projection, chunk_size=5)
    assert torch.allclose(streamed, projection(full), atol=1e-6)


# The linear fast path: outer products delta_i a_i^T from one batched forward and one backward pass.

def both_methods(model, inputs, targets, **kwargs):
    fast = per_example_gradients(model, cross_entropy, inputs, targets, method="linear", **kwargs)
    slow = per_example_gradients(model, cross_entropy, inputs, targets, method="vmap", **kwargs)
    return fast, slow


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-10)])
@pytest.mark.parametrize("params", [None, "last"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_linear_fast_path_equals_vmap(tiny_mlp, dtype, tolerance, params, chunk_size):
    model, inputs, targets = tiny_mlp
    params = last_layer(model) if params == "last" else None
    assert gradient_method(model, params) == "linear"
    fast, slow = both_methods(model, inputs, targets, params=params, chunk_size=chunk_size, dtype=dtype)
    assert fast.dtype == slow.dtype == dtype
    assert fast.shape == slow.shape == (13, 24 if params else 66)
    assert torch.allclose(fast, slow, atol=tolerance, rtol=0)
    auto = per_example_gradients(model, cross_entropy, inputs, targets, params=params, chunk_size=chunk_size,
                                 dtype=dtype)
    assert torch.equal(auto, fast)
    assert torch.allclose(fast, loop_gradients(model.double(), inputs.double(), targets, params).to(dtype),
                          atol=1e-6, rtol=0)


def test_linear_fast_path_on_a_deeper_model_with_per_example_layers():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 9, bias=False), nn.GELU(), nn.Dropout(0.5),
        nn.Sequential(nn.Linear(9, 8), nn.LayerNorm(8), nn.Sigmoid()), nn.Linear(8, 4),
    ).double()
    model.train()
    inputs = torch.randn(11, 3, 4, dtype=torch.float64)
    targets = torch.randint(0, 4, (11,))
    assert gradient_method(model) == "vmap"  # the LayerNorm's own parameters are chosen
    linear_only = [name for name, _ in model.named_parameters() if not name.startswith("4.1.")]
    assert gradient_method(model, linear_only) == "linear"
    for params in (linear_only, ["4.0.bias", "5.weight"], ["1.weight"]):
        fast, slow = both_methods(model, inputs, targets, params=params, chunk_size=5)
        assert torch.allclose(fast, slow, atol=1e-10, rtol=0)
    assert model.training  # eval mode during the pass (no dropout), restored afterwards


def test_linear_fast_path_sums_outer_products_over_extra_positions():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3), nn.Flatten())
    inputs = torch.randn(7, 4, 5)  # 4 positions per example, each through the same Linear layers
    targets = torch.randint(0, 12, (7,))
    fast, slow = both_methods(model, inputs, targets, dtype=torch.float64)
    assert torch.allclose(fast, slow, atol=1e-10, rtol=0)


def test_iterated_chunks_of_the_fast_path_are_separate_tensors(tiny_mlp):
    model, inputs, targets = tiny_mlp
    chunks = list(iter_per_example_gradients(model, cross_entropy, inputs, targets, chunk_size=5))
    assert [start for start, _ in chunks] == [0, 5, 10]
    whole = per_example_gradients(model, cross_entropy, inputs, targets, method="vmap")
    assert torch.allclose(torch.cat([grads for _, grads in chunks]), whole, atol=1e-6, rtol=0)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.linear(x)


@pytest.mark.parametrize(("model", "why"), [
    (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)), "not the weight or bias of an nn.Linear"),
    (nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)), "not the weight or bias of an nn.Linear"),
    (nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3)), "couples the examples"),
    (nn.Sequential(nn.Linear(6, 4), Residual(), nn.Linear(4, 3)), "Residual"),
    (nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)), "ReLU"),
])
def test_models_outside_the_fast_path_fall_back_to_vmap(model, why):
    torch.manual_seed(3)
    inputs = torch.randn(6, 1, 6) if isinstance(model[0], nn.Conv1d) else torch.randn(6, 6)
    targets = torch.randint(0, 3, (6,))
    assert gradient_method(model) == "vmap"
    with pytest.raises(SimfluenceError, match=why):
        gradient_method(model, method="linear")
    with pytest.raises(SimfluenceError, match="linear fast path does not apply"):
        per_example_gradients(model, cross_entropy, inputs, targets, method="linear")
    auto = per_example_gradients(model, cross_entropy, inputs, targets, dtype=torch.float64)
    assert torch.equal(auto, per_example_gradients(model, cross_entropy, inputs, targets, dtype=torch.float64,
                                                   method="vmap"))
    if isinstance(model[0], nn.Conv1d):  # with the Conv frozen, the last Linear alone takes the fast path
        assert gradient_method(model, last_layer(model)) == "linear"
        fast, slow = both_methods(model, inputs, targets, params=last_layer(model), dtype=torch.float64)
        assert torch.allclose(fast, slow, atol=1e-10, rtol=0)


def test_a_linear_layer_used_twice_falls_back():
    torch.manual_seed(4)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3))
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    expected = loop_gradients(model, inputs, targets)  # first: the vmap path leaves a shared weight unusable
    assert gradient_method(model) == "vmap"
    assert gradient_method(model, ["3.weight", "3.bias"]) == "linear"
    with pytest.raises(SimfluenceError, match="shared between modules"):
        per_example_gradients(model, cross_entropy, inputs, targets, method="linear")
    auto = per_example_gradients(model, cross_entropy, inputs, targets, chunk_size=3, dtype=torch.float64)
    slow = per_example_gradients(model, cross_entropy, inputs, targets, chunk_size=3, dtype=torch.float64,
                                 method="vmap")
    assert torch.equal(auto, slow)
    assert torch.allclose(auto, expected.double(), atol=1e-6, rtol=0)


def test_a_loss_that_is_not_per_example_falls_back(tiny_mlp):
    model, inputs, targets = tiny_mlp

    def mean_loss(outputs, targets):
        return functional.cross_entropy(outputs, targets)

    auto = per_example_gradients(model, mean_loss, inputs, targets, dtype=torch.float64)
    expected = per_example_gradients(model, cross_entropy, inputs, targets, dtype=torch.float64, method="vmap")
    assert torch.allclose(auto, expected, atol=1e-12, rtol=0)


def test_unknown_method_is_a_clear_error(tiny_mlp):
    model, inputs, targets = tiny_mlp
    with pytest.raises(SimfluenceError, match="method must be one of"):
        per_example_gradients(model, cross_entropy, inputs, targets, method="fast")


def test_the_fast_path_leaves_the_model_alone(tiny_mlp):
    model, inputs, targets = tiny_mlp
    model[0].bias.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    per_example_gradients(model, cross_entropy, inputs, targets, method="linear")
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
    assert all(p.grad is None for p in model.parameters())
