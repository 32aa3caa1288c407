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
