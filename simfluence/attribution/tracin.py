"""TracIn / TracIn-CP (Pruthi et al. 2020): learning-rate-weighted gradient dot products over checkpoints.

For pool example z_i and test example z, with checkpoints theta_k saved during training and eta_k the
learning rate at checkpoint k::

    TracIn(z_i, z) = sum_k eta_k * g(z_i; theta_k) . g(z; theta_k)          (variant "dot")
    TracIn-cos     = sum_k eta_k * cos(g(z_i; theta_k), g(z; theta_k))       (variant "cosine")

A positive score marks a proponent: one SGD step on z_i at theta_k changes z's loss by about
``-eta_k g_i . g`` (for a batch of one). The pool side is streamed in chunks of examples, so only the test
gradients and one chunk of pool gradients are held at a time.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from simfluence.attribution.checkpoints import Checkpoint, model_at
from simfluence.attribution.gradients import LossFn, ParamSpec, iter_per_example_gradients, per_example_gradients
from simfluence.errors import SimfluenceError

__all__ = ["gradient_similarity", "tracin_scores"]

VARIANTS = ("dot", "cosine")


def gradient_similarity(
    model: nn.Module,
    loss_fn: LossFn,
    pool_inputs: torch.Tensor,
    pool_targets: torch.Tensor,
    test_inputs: torch.Tensor,
    test_targets: torch.Tensor,
    variant: str = "dot",
    params: ParamSpec = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> np.ndarray:
    """(n_pool, n_test) gradient dot products (or cosines) at the model's current weights."""
    if variant not in VARIANTS:
        raise SimfluenceError(f"variant must be one of {VARIANTS}, got {variant!r}")
    test_grads = per_example_gradients(model, loss_fn, test_inputs, test_targets, params, chunk_size, dtype)
    if variant == "cosine":
        test_grads = unit_rows(test_grads)
    out = np.empty((len(pool_inputs), len(test_inputs)))
    for start, grads in iter_per_example_gradients(model, loss_fn, pool_inputs, pool_targets, params, chunk_size,
                                                   dtype):
        if variant == "cosine":
            grads = unit_rows(grads)
        out[start:start + len(grads)] = (grads @ test_grads.T).double().cpu().numpy()
    return out


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Each row divided by its norm (zero rows stay zero): cosine similarity as a dot product."""
    norms = vectors.norm(dim=1, keepdim=True)
    return vectors / torch.where(norms > 0, norms, torch.ones_like(norms))


def tracin_scores(
    model: nn.Module,
    loss_fn: LossFn,
    pool_inputs: torch.Tensor,
    pool_targets: torch.Tensor,
    test_inputs: torch.Tensor,
    test_targets: torch.Tensor,
    checkpoints: Sequence[Checkpoint],
    variant: str = "dot",
    params: ParamSpec = None,
    per_checkpoint: bool = False,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> np.ndarray:
    """TracIn-CP scores of every pool example for every test example.

    Parameters
    ----------
    model : a module of the right architecture (its weights are replaced by each checkpoint's, on a copy).
    loss_fn : per-example loss ``loss_fn(outputs, targets) -> (batch,)``.
    pool_inputs, pool_targets, test_inputs, test_targets : the examples.
    checkpoints : the training states theta_k with their learning rates eta_k.
    variant : ``"dot"`` (gradient dot product) or ``"cosine"``.
    params : parameter subset (see :func:`~simfluence.attribution.gradients.select_parameters`).
    per_checkpoint : return the unweighted per-checkpoint terms ``g_i . g`` (K, n_pool, n_test) instead of
        their eta-weighted sum.
    chunk_size : examples per vectorised gradient pass (default: about 64 MiB of gradients).
    dtype : compute dtype (float64 default: exact sums for small models).

    Returns
    -------
    (n_pool, n_test) float64 scores, or (K, n_pool, n_test) with ``per_checkpoint``.
    """
    if not checkpoints:
        raise SimfluenceError("TracIn needs at least one checkpoint")
    template = copy.deepcopy(model)
    terms = []
    for checkpoint in checkpoints:
        at_checkpoint = model_at(template, checkpoint)
        terms.append(gradient_similarity(at_checkpoint, loss_fn, pool_inputs, pool_targets, test_inputs,
                                         test_targets, variant, params, chunk_size, dtype))
    stacked = np.stack(terms)
    if per_checkpoint:
        return stacked
    rates = np.array([checkpoint.learning_rate for checkpoint in checkpoints])
    if not np.all(np.isfinite(rates)):
        raise SimfluenceError("TracIn weights checkpoints by their learning rate; a checkpoint has none")
    return np.tensordot(rates, stacked, axes=1)
