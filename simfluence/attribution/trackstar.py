"""TrackStar-style gradient similarity (Chang et al. 2024, "Scalable influence and fact tracing for LLM pretraining").

Each example z becomes a unit vector built from its loss gradient at a checkpoint, in four switchable steps::

    g      = grad loss(z; theta)                                 per-example gradient
    g     <- g / (sqrt(v) + eps)                                  optimizer second-moment correction
    phi    = P g                                                  Gaussian random projection to d dims
    phi   <- R^{-1/2} phi,   R = lam R_eval + (1 - lam) R_train   task-specific Hessian approximation
    phi   <- phi / |phi|                                          unit normalisation
    score(i, z) = phi_i . phi_z                                   (a cosine when unit-normalised)

- **optimizer correction**: v is Adam's ``exp_avg_sq`` (bias-corrected) from the checkpoint's saved optimizer
  state. A run trained with plain or momentum SGD has no second moment; the step is then skipped (reported in
  the returned info) rather than faked.
- **projection**: :class:`~simfluence.attribution.projection.GaussianProjection`, streamed in chunks of examples.
- **task-specific Hessian**: ``R_train`` and ``R_eval`` are the second-moment matrices (mean of ``phi phi^T``)
  of the projected pool and test (evaluation) gradients. Mixing in ``R_eval`` down-weights the directions the
  evaluation examples share (e.g. a common output format) so retrieval keys on what is specific to each query.
  ``lam="auto"`` puts the crossing of the two scaled, sorted eigenvalue curves at component k:
  ``lam * e_k = (1 - lam) * t_k`` (``e``, ``t`` the descending eigenvalues of ``R_eval``, ``R_train``). R is damped
  by ``damping * trace(R) / d`` before ``R^{-1/2}`` is taken.
- **unit normalisation**: scores become cosines in [-1, 1].

With several checkpoints the per-checkpoint scores are averaged. Scores are positive for proponents.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from simfluence.attribution.checkpoints import Checkpoint, model_at
from simfluence.attribution.gradients import LossFn, ParamSpec, iter_per_example_gradients, select_parameters
from simfluence.attribution.projection import GaussianProjection
from simfluence.attribution.tracin import unit_rows
from simfluence.errors import SimfluenceError

__all__ = ["choose_mixing", "second_moment_scale", "trackstar_features", "trackstar_scores"]

HESSIANS = ("mixed", "train", "none")


def second_moment_scale(model: nn.Module, checkpoint: Checkpoint, params: ParamSpec = None,
                        eps: float = 1e-8) -> torch.Tensor | None:
    """Flat ``sqrt(v_hat + eps_root) + eps`` of Adam's bias-corrected second moment for the selected parameters
    (``eps_root``: the checkpoint's parameter group's, as :class:`simfluence.optim.Adam` saves it; 0 for torch's).

    Returns None when the checkpoint's optimizer state holds no ``exp_avg_sq`` (SGD runs).
    """
    state = (checkpoint.optimizer_state or {}).get("state") or {}
    groups = (checkpoint.optimizer_state or {}).get("param_groups") or []
    if not state or not any("exp_avg_sq" in entry for entry in state.values()):
        return None
    names = [name for name, _ in model.named_parameters()]
    index_of = {}
    beta2_of = {}
    eps_root_of = {}
    for group in groups:  # state_dict ids are positions in the order parameters were given to the optimizer
        for position in group["params"]:
            index_of[position] = names[position] if position < len(names) else None
            beta2_of[position] = float(group.get("betas", (0.9, 0.999))[1])
            eps_root_of[position] = float(group.get("eps_root", 0.0))
    by_name = {}
    for position, entry in state.items():
        position = int(position)
        name = index_of.get(position)
        if name is None or "exp_avg_sq" not in entry:
            continue
        step = float(entry.get("step", 0))
        correction = 1.0 - beta2_of[position] ** step if step > 0 else 1.0
        by_name[name] = (entry["exp_avg_sq"].double() / correction + eps_root_of[position]).sqrt() + eps
    selection = select_parameters(model, params)
    missing = [name for name in selection.names if name not in by_name]
    if missing:
        raise SimfluenceError(f"optimizer state of checkpoint {checkpoint.source or checkpoint.step} has no "
                              f"second moment for parameter {missing[0]!r}")
    return selection.flatten(by_name)


def trackstar_features(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor | None = None,
    projection: GaussianProjection | None = None,
    params: ParamSpec = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """(n, d) corrected, projected gradients (float64, on the CPU): ``P (g / scale)``; no projection gives
    (n, n_params). The gradients are computed on the model's device, one chunk at a time."""
    chunks = []
    for _, grads in iter_per_example_gradients(model, loss_fn, inputs, targets, params, chunk_size, torch.float64):
        grads = grads.cpu()
        if scale is not None:
            grads = grads / scale
        chunks.append(projection.project(grads) if projection is not None else grads)
    return torch.cat(chunks)


def choose_mixing(r_eval: torch.Tensor, r_train: torch.Tensor, k: int) -> float:
    """``lam`` with ``lam * e_k = (1 - lam) * t_k`` for the k-th largest eigenvalues (1-based) of the two matrices."""
    eigen_eval = torch.linalg.eigvalsh(r_eval).flip(0).clamp_min(0)
    eigen_train = torch.linalg.eigvalsh(r_train).flip(0).clamp_min(0)
    k = min(max(int(k), 1), len(eigen_eval))
    e_k, t_k = float(eigen_eval[k - 1]), float(eigen_train[k - 1])
    if e_k + t_k <= 0:
        return 0.0
    return t_k / (e_k + t_k)


def _inverse_sqrt(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    matrix = 0.5 * (matrix + matrix.T)
    shift = damping * float(torch.trace(matrix)) / matrix.shape[0]
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(0) + max(shift, torch.finfo(matrix.dtype).tiny)
    return (vectors * values.rsqrt()) @ vectors.T


def trackstar_scores(
    model: nn.Module,
    loss_fn: LossFn,
    pool_inputs: torch.Tensor,
    pool_targets: torch.Tensor,
    test_inputs: torch.Tensor,
    test_targets: torch.Tensor,
    checkpoints: Sequence[Checkpoint],
    optimizer_correction: bool = True,
    projection_dim: int | None = 1024,
    hessian: str = "mixed",
    lam: float | str = "auto",
    crossing_k: int | None = None,
    damping: float = 1e-3,
    unit_normalize: bool = True,
    params: ParamSpec = None,
    seed: int = 0,
    eps: float = 1e-8,
    chunk_size: int | None = None,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict]:
    """TrackStar scores of every pool example for every test example (module docstring for the recipe).

    Parameters
    ----------
    model : a module of the right architecture (each checkpoint's weights are loaded into a copy).
    loss_fn : per-example loss.
    pool_inputs, pool_targets, test_inputs, test_targets : the examples.
    checkpoints : the checkpoints to use (scores are averaged over them).
    optimizer_correction : divide gradients by Adam's ``sqrt(v) + eps`` (skipped when the state has none).
    projection_dim : d of the random projection (None: no projection; d >= n_params is also skipped).
    hessian : ``"mixed"`` (``lam R_eval + (1 - lam) R_train``), ``"train"`` (``R_train`` only) or ``"none"``.
    lam : mixing weight in [0, 1], or ``"auto"`` (eigenvalue crossing at ``crossing_k``).
    crossing_k : component k of the crossing (default ``max(1, min(100, min(n_test, d) // 4))``).
    damping : relative damping of R (``damping * trace(R) / d``).
    unit_normalize : normalise the features to unit length (scores become cosines).
    params : parameter subset.
    seed : seed of the projection.
    eps : added to ``sqrt(v)``.
    chunk_size : examples per vectorised gradient pass (default: about 64 MiB of gradients).
    return_info : also return ``{"optimizer_correction", "lam", "crossing_k", "dim"}`` per checkpoint.

    Returns
    -------
    (n_pool, n_test) float64 scores; in [-1, 1] with ``unit_normalize``.
    """
    if hessian not in HESSIANS:
        raise SimfluenceError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
    if not isinstance(lam, str) and not 0.0 <= float(lam) <= 1.0:
        raise SimfluenceError(f"lam must lie in [0, 1] or be 'auto', got {lam!r}")
    if isinstance(lam, str) and lam != "auto":
        raise SimfluenceError(f"lam must lie in [0, 1] or be 'auto', got {lam!r}")
    if not checkpoints:
        raise SimfluenceError("TrackStar needs at least one checkpoint")
    template = copy.deepcopy(model)
    n_params = select_parameters(template, params).n_params
    projection = None
    if projection_dim is not None and int(projection_dim) < n_params:
        projection = GaussianProjection(n_params, int(projection_dim), seed=seed)
    total = np.zeros((len(pool_inputs), len(test_inputs)))
    infos = []
    for checkpoint in checkpoints:
        at = model_at(template, checkpoint)
        scale = second_moment_scale(at, checkpoint, params, eps) if optimizer_correction else None
        info = {"step": checkpoint.step,
                "optimizer_correction": "applied" if scale is not None else
                ("skipped: no Adam second moment in the optimizer state (SGD run)" if optimizer_correction
                 else "off")}
        pool = trackstar_features(at, loss_fn, pool_inputs, pool_targets, scale, projection, params, chunk_size)
        test = trackstar_features(at, loss_fn, test_inputs, test_targets, scale, projection, params, chunk_size)
        info["dim"] = pool.shape[1]
        if hessian != "none":
            r_train = pool.T @ pool / len(pool)
            mixed = r_train
            if hessian == "mixed":
                r_eval = test.T @ test / len(test)
                k = crossing_k if crossing_k is not None else max(1, min(100, min(len(test), pool.shape[1]) // 4))
                weight = choose_mixing(r_eval, r_train, k) if lam == "auto" else float(lam)
                mixed = weight * r_eval + (1.0 - weight) * r_train
                info.update({"lam": weight, "crossing_k": int(k)})
            whitening = _inverse_sqrt(mixed, damping)
            pool, test = pool @ whitening, test @ whitening
        if unit_normalize:
            pool, test = unit_rows(pool), unit_rows(test)
        total += (pool @ test.T).numpy()
        infos.append(info)
    scores = total / len(checkpoints)
    return (scores, {"checkpoints": infos}) if return_info else scores
