"""TracIn equals its definition: learning-rate-weighted gradient dot products summed over checkpoints."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from simfluence.attribution.checkpoints import Checkpoint
from simfluence.attribution.tracin import tracin_scores


def cross_entropy(outputs, targets):
    return functional.cross_entropy(outputs, targets, reduction="none")


def single_gradient(model, x, y):
    model.zero_grad()
    cross_entropy(model(x[None]), y[None]).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_tracin_equals_its_definition_computed_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    pool_x, pool_y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    test_x, test_y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    checkpoints = []
    for step, lr in ((0, 0.5), (10, 0.2)):
        state = {name: value + 0.3 * torch.randn_like(value) for name, value in model.state_dict().items()}
        checkpoints.append(Checkpoint(step=step, learning_rate=lr, model_state=state))

    expected_dot = np.zeros((6, 3))
    expected_cos = np.zeros((6, 3))
    for checkpoint in checkpoints:
        model.load_state_dict(checkpoint.model_state)
        for i in range(6):
            g_i = single_gradient(model, pool_x[i], pool_y[i])
            for j in range(3):
                g_j = single_gradient(model, test_x[j], test_y[j])
                dot = sum(float((a * b).sum()) for a, b in zip(g_i, g_j, strict=True))
                norm_i = np.sqrt(sum(float((a * a).sum()) for a in g_i))
                norm_j = np.sqrt(sum(float((b * b).sum()) for b in g_j))
                expected_dot[i, j] += checkpoint.learning_rate * dot
                expected_cos[i, j] += checkpoint.learning_rate * dot / (norm_i * norm_j)

    template = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    dot = tracin_scores(template, cross_entropy, pool_x, pool_y, test_x, test_y, checkpoints, chunk_size=4)
    cos = tracin_scores(template, cross_entropy, pool_x, pool_y, test_x, test_y, checkpoints, variant="cosine")
    np.testing.assert_allclose(dot, expected_dot, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cos, expected_cos, rtol=1e-10, atol=1e-12)
    terms = tracin_scores(template, cross_entropy, pool_x, pool_y, test_x, test_y, checkpoints, per_checkpoint=True)
    assert terms.shape == (2, 6, 3)
    np.testing.assert_allclose(0.5 * terms[0] + 0.2 * terms[1], dot, rtol=1e-12)
