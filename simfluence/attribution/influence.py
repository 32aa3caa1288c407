"""Influence functions (Koh & Liang 2017): ``g_test^T (H + damping I)^{-1} g_train`` at one set of weights.

H is the Hessian of the mean training loss over the chosen parameters (all, or a subset such as the last
layer) at the given weights. Three ways to apply its damped inverse (``solver="auto"``, the default, is
``"exact"`` up to ``DENSE_MAX_PARAMS`` parameters and ``"cg"`` above):

- ``solver="exact"``: build H (``torch.func.hessian``, or the Gauss-Newton matrix ``J^T H_out J``) and solve
  directly -- small models or parameter subsets only (n_params^2 memory; refused, before anything is
  allocated, when the matrix would exceed ``DENSE_MAX_BYTES``);
- ``solver="cg"``: batched conjugate gradient on Hessian-vector products (``jvp`` of ``grad``), one column
  per test example, no matrix formed;
- ``solver="lissa"``: the LiSSA recursion ``h <- v + h - (H + damping I) h / scale`` on Hessian-vector
  products, optionally on random mini-batches of the Hessian data.

``hessian="gauss_newton"`` replaces H by the (positive semi-definite) generalised Gauss-Newton matrix
``mean_i J_i^T H_out,i J_i``, J_i the Jacobian of example i's outputs and ``H_out,i`` the Hessian of its
loss in the outputs (softmax cross-entropy: ``diag(p) - p p^T``); it is the usual choice away from a
minimum, where the exact Hessian is indefinite.

Scores follow the package's sign convention (positive = proponent): ``score(i, z) = g_z^T (H + dI)^{-1} g_i``
is, for a training objective ``(1/n) sum_i loss_i + ...``, about ``n`` times the *increase* of z's loss when
example i is removed and the model retrained; Koh & Liang's ``I_up,loss`` is its negative.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vjp, vmap

from simfluence.attribution.gradients import (
    LossFn,
    ParamSpec,
    _cast_inputs,
    _EvalMode,
    _functional_state,
    per_example_gradients,
    select_parameters,
    twice_differentiable,
)
from simfluence.errors import SimfluenceError

__all__ = ["hessian_matrix", "hvp_function", "influence_scores", "solve_cg", "solve_exact", "solve_lissa"]

HESSIANS = ("exact", "gauss_newton")
SOLVERS = ("auto", "exact", "cg", "lissa")
DENSE_MAX_PARAMS = 8192  # solver="auto" builds the Hessian up to this many parameters (512 MiB in float64), else CG
DENSE_MAX_BYTES = 4 * 2**30  # a dense Hessian larger than this is refused (a ~100k-parameter model would need 80 GB)
MatVec = Callable[[torch.Tensor], torch.Tensor]


class _Objective:
    """The mean loss of a data set as a function of the flat vector of the chosen parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor,
                 params: ParamSpec, dtype: torch.dtype | None, chunk_size: int) -> None:
        if len(inputs) != len(targets):
            raise SimfluenceError(f"{len(inputs)} inputs but {len(targets)} targets")
        if len(inputs) == 0:
            raise SimfluenceError("the Hessian needs at least one example")
        self.model, self.loss_fn = model, loss_fn
        self.selection = select_parameters(model, params)
        with _EvalMode(model):
            chosen, self.rest = _functional_state(model, self.selection, dtype)
        self.theta = self.selection.flatten(chosen)
        self.inputs = _cast_inputs(inputs, dtype)
        self.targets = targets
        self.n = len(inputs)
        self.chunk_size = max(1, int(chunk_size))

    def chunks(self, index: torch.Tensor | None = None):
        """Yield (inputs, targets, weight) with weights summing to 1 over the chunks (of ``index`` rows)."""
        rows = torch.arange(self.n) if index is None else index
        for start in range(0, len(rows), self.chunk_size):
            part = rows[start:start + self.chunk_size]
            device = self.theta.device  # data stays where it is; each chunk goes to the model's device
            yield self.inputs[part].to(device), self.targets[part].to(device), len(part) / len(rows)

    def outputs(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.rest, **self.selection.unflatten(flat)}, (x,))

    def mean_loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.outputs(flat, x), y).mean()


def hessian_matrix(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: ParamSpec = None,
    kind: str = "exact",
    chunk_size: int = 64,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """(n_params, n_params) Hessian (or Gauss-Newton matrix) of the mean loss over ``inputs``.

    Parameters
    ----------
    model, loss_fn, inputs, targets : the objective ``mean_i loss_fn(model(x_i), y_i)``.
    params : parameter subset (flattened in model order).
    kind : ``"exact"`` or ``"gauss_newton"``.
    chunk_size : examples per pass (memory ~ n_params * chunk_size * activations).
    dtype : compute dtype.
    """
    if kind not in HESSIANS:
        raise SimfluenceError(f"hessian must be one of {HESSIANS}, got {kind!r}")
    with _EvalMode(model), twice_differentiable():
        objective = _Objective(model, loss_fn, inputs, targets, params, dtype, chunk_size)
        n_params = objective.theta.numel()
        _check_dense_size(n_params, objective.theta.dtype)
        total = torch.zeros(n_params, n_params, dtype=objective.theta.dtype, device=objective.theta.device)
        for x, y, weight in objective.chunks():
            if kind == "exact":
                total += weight * hessian(objective.mean_loss)(objective.theta, x, y)
            else:
                total += weight * _gauss_newton_chunk(objective, x, y)
    return 0.5 * (total + total.T)


def _check_dense_size(n_params: int, dtype: torch.dtype) -> None:
    """Refuse a dense (n_params, n_params) Hessian larger than ``DENSE_MAX_BYTES``, before it is allocated."""
    needed = n_params * n_params * torch.finfo(dtype).bits // 8
    if needed > DENSE_MAX_BYTES:
        raise SimfluenceError(f"a dense Hessian of {n_params} parameters needs {needed / 2**30:.3g} GiB (more than "
                              f"{DENSE_MAX_BYTES / 2**30:g} GiB): use solver='cg' or 'auto' (matrix-free), or fewer "
                              "parameters (params='last_layer')")


def _gauss_newton_chunk(objective: _Objective, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the chunk of ``J_i^T H_out,i J_i``."""
    def outputs_of_one(flat, xi):
        return objective.outputs(flat, xi.unsqueeze(0)).reshape(-1)

    def loss_of_outputs(out, yi):
        return objective.loss_fn(out.reshape(1, -1), yi.unsqueeze(0)).sum()

    jac = vmap(jacrev(outputs_of_one), in_dims=(None, 0))(objective.theta, x)          # (b, o, P)
    out = vmap(outputs_of_one, in_dims=(None, 0))(objective.theta, x)                  # (b, o)
    out_hessian = vmap(hessian(loss_of_outputs))(out, y)                               # (b, o, o)
    n_params = jac.shape[-1]
    weighted = torch.bmm(out_hessian, jac)                                             # (b, o, P)
    return jac.reshape(-1, n_params).T @ weighted.reshape(-1, n_params) / len(x)


def hvp_function(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: ParamSpec = None,
    kind: str = "exact",
    chunk_size: int = 256,
    dtype: torch.dtype | None = torch.float64,
    batch_size: int | None = None,
    seed: int = 0,
) -> tuple[MatVec, int]:
    """Matrix-free Hessian (or Gauss-Newton) products of the mean loss.

    Returns
    -------
    matvec : ``matvec(V)`` for V of shape (n_params, m): H V, one vectorised pass per chunk of examples. With
        ``batch_size``, each call uses a fresh random mini-batch of that many examples (stochastic, for LiSSA).
    n_params : size of the flat parameter vector.
    """
    if kind not in HESSIANS:
        raise SimfluenceError(f"hessian must be one of {HESSIANS}, got {kind!r}")
    objective = _Objective(model, loss_fn, inputs, targets, params, dtype, chunk_size)
    theta = objective.theta
    generator = torch.Generator().manual_seed(seed)

    def exact_chunk(columns, x, y):
        def one(v):
            return jvp(lambda flat: grad(objective.mean_loss)(flat, x, y), (theta,), (v,))[1]
        return vmap(one, in_dims=1, out_dims=1)(columns)

    def gauss_newton_chunk(columns, x, y):
        def outputs(flat):
            return objective.outputs(flat, x)

        out, backward = vjp(outputs, theta)

        def loss_of_outputs(o):
            return objective.loss_fn(o, y).mean()

        def one(v):
            jv = jvp(outputs, (theta,), (v,))[1]
            hjv = jvp(grad(loss_of_outputs), (out,), (jv,))[1]
            return backward(hjv)[0]
        return vmap(one, in_dims=1, out_dims=1)(columns)

    product = exact_chunk if kind == "exact" else gauss_newton_chunk

    def matvec(columns: torch.Tensor) -> torch.Tensor:
        index = None
        if batch_size is not None:
            index = torch.randperm(objective.n, generator=generator)[:batch_size]
        with _EvalMode(model), twice_differentiable():
            total = torch.zeros_like(columns)
            for x, y, weight in objective.chunks(index):
                total += weight * product(columns, x, y)
        return total

    return matvec, theta.numel()


# ------------------------------------------------------------------------------------------- solvers
def solve_exact(matrix: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """``(matrix + damping I)^{-1} rhs`` by a dense solve; rhs (n_params, m)."""
    damped = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    try:
        return torch.linalg.solve(damped, rhs.to(matrix.dtype))
    except RuntimeError as err:
        raise SimfluenceError(f"H + damping I is singular (increase damping={damping}): {err}") from None


def solve_cg(matvec: MatVec, rhs: torch.Tensor, damping: float, tol: float = 1e-8,
             max_iter: int = 1000) -> tuple[torch.Tensor, dict]:
    """Batched conjugate gradient for ``(H + damping I) X = rhs``, every column at once.

    Needs ``H + damping I`` positive definite (use the Gauss-Newton matrix or enough damping).

    Returns
    -------
    X : (n_params, m) solution.
    info : ``{"iterations", "max_relative_residual"}``.
    """
    def apply(columns):
        return matvec(columns) + damping * columns

    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rhs_norm = rhs.norm(dim=0)
    target = tol * rhs_norm
    rho = (residual * residual).sum(dim=0)
    active = rho.sqrt() > target  # converged columns (and zero right-hand sides) stop moving
    iterations = 0
    while bool(active.any()) and iterations < max_iter:
        iterations += 1
        product = apply(direction)
        curvature = (direction * product).sum(dim=0)
        if torch.any(curvature[active] <= 0):
            raise SimfluenceError("conjugate gradient met non-positive curvature: H + damping I is not positive "
                                  "definite (use hessian='gauss_newton' or a larger damping)")
        step = torch.where(active, rho / torch.where(active, curvature, torch.ones_like(curvature)), 0.0)
        solution += step * direction
        residual -= step * product
        rho_next = (residual * residual).sum(dim=0)
        beta = torch.where(active, rho_next / torch.where(active, rho, torch.ones_like(rho)), 0.0)
        direction = residual + beta * direction
        rho = rho_next
        active = active & (rho.sqrt() > target)
    relative = rho.sqrt() / rhs_norm.clamp_min(torch.finfo(rhs.dtype).tiny)
    info = {"iterations": iterations, "max_relative_residual": float(relative.max()) if relative.numel() else 0.0}
    return solution, info


def solve_lissa(matvec: MatVec, rhs: torch.Tensor, damping: float, scale: float, depth: int = 1000,
                repeats: int = 1, tol: float = 0.0) -> torch.Tensor:
    """LiSSA (Agarwal et al. 2017) estimate of ``(H + damping I)^{-1} rhs``.

    Iterates ``h <- rhs + h - (H h + damping h) / scale`` (a Neumann series of ``(H + dI) / scale``), so
    ``h / scale`` tends to the solution when ``scale`` exceeds the largest eigenvalue of ``H + dI`` and H + dI
    is positive definite. A stochastic ``matvec`` (mini-batches) gives an unbiased-in-the-limit estimate;
    ``repeats`` independent recursions are averaged. Stops early when an update changes h by less than
    ``tol`` relative to its norm.
    """
    if not scale > 0:
        raise SimfluenceError(f"LiSSA needs scale > 0, got {scale}")
    estimates = []
    for _ in range(max(1, repeats)):
        estimate = rhs.clone()
        for _ in range(depth):
            updated = rhs + estimate - (matvec(estimate) + damping * estimate) / scale
            change = (updated - estimate).norm()
            estimate = updated
            if not torch.isfinite(change):
                raise SimfluenceError(f"LiSSA diverged: scale={scale} is below the largest eigenvalue of H + dI")
            if tol and change <= tol * estimate.norm():
                break
        estimates.append(estimate / scale)
    return torch.stack(estimates).mean(dim=0)


# ------------------------------------------------------------------------------------------- scores
def influence_scores(
    model: nn.Module,
    loss_fn: LossFn,
    pool_inputs: torch.Tensor,
    pool_targets: torch.Tensor,
    test_inputs: torch.Tensor,
    test_targets: torch.Tensor,
    params: ParamSpec = None,
    damping: float = 1e-3,
    hessian: str = "exact",
    solver: str = "auto",
    hessian_inputs: torch.Tensor | None = None,
    hessian_targets: torch.Tensor | None = None,
    chunk_size: int = 64,
    dtype: torch.dtype | None = torch.float64,
    cg_tol: float = 1e-8,
    max_iter: int = 1000,
    lissa_scale: float | None = None,
    lissa_depth: int = 1000,
    lissa_batch_size: int | None = None,
    seed: int = 0,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict]:
    """Influence of every pool example on every test example's loss, ``g_test^T (H + dI)^{-1} g_pool``.

    Parameters
    ----------
    model : the trained module (its current weights are used).
    loss_fn : per-example loss ``loss_fn(outputs, targets) -> (batch,)``.
    pool_inputs, pool_targets, test_inputs, test_targets : the examples.
    params : parameter subset for gradients and Hessian (e.g. ``last_layer(model)``).
    damping : added to the Hessian's diagonal (an L2 penalty of the training objective belongs here).
    hessian : ``"exact"`` or ``"gauss_newton"``.
    solver : ``"auto"`` (dense up to ``DENSE_MAX_PARAMS`` parameters, else CG), ``"exact"`` (dense), ``"cg"`` or
        ``"lissa"``.
    hessian_inputs, hessian_targets : data of the Hessian (default: the pool).
    chunk_size : examples per vectorised Hessian pass (gradients use the automatic chunk size).
    dtype : compute dtype.
    cg_tol, max_iter : conjugate-gradient tolerance and iteration cap.
    lissa_scale : LiSSA scale (default: 1.5 x a power-iteration estimate of the largest eigenvalue).
    lissa_depth : LiSSA recursion depth; ``lissa_batch_size`` makes it stochastic (mini-batch Hessians).
    seed : seed of LiSSA's mini-batches.
    return_info : also return solver information.

    Returns
    -------
    (n_pool, n_test) float64 scores (positive: the pool example lowers the test loss).
    """
    if solver not in SOLVERS:
        raise SimfluenceError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if hessian not in HESSIANS:
        raise SimfluenceError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
    if not damping >= 0:
        raise SimfluenceError(f"damping must be >= 0, got {damping}")
    h_inputs = pool_inputs if hessian_inputs is None else hessian_inputs
    h_targets = pool_targets if hessian_targets is None else hessian_targets
    test_grads = per_example_gradients(model, loss_fn, test_inputs, test_targets, params, dtype=dtype)
    rhs = test_grads.T.contiguous()                                                     # (P, n_test)
    if solver == "auto":
        solver = "exact" if rhs.shape[0] <= DENSE_MAX_PARAMS else "cg"
    info: dict = {"solver": solver, "hessian": hessian, "n_params": rhs.shape[0]}
    if solver == "exact":
        _check_dense_size(rhs.shape[0], rhs.dtype)
        matrix = hessian_matrix(model, loss_fn, h_inputs, h_targets, params, hessian, chunk_size, dtype)
        solved = solve_exact(matrix, rhs, damping)
    else:
        matvec, _ = hvp_function(model, loss_fn, h_inputs, h_targets, params, hessian, chunk_size, dtype)
        if solver == "cg":
            solved, cg_info = solve_cg(matvec, rhs, damping, cg_tol, max_iter)
            info.update(cg_info)
        else:
            scale = lissa_scale
            if scale is None:
                scale = 1.5 * (largest_eigenvalue(matvec, rhs.shape[0], rhs.dtype, device=rhs.device) + damping)
            if lissa_batch_size is not None:
                matvec, _ = hvp_function(model, loss_fn, h_inputs, h_targets, params, hessian, chunk_size, dtype,
                                         batch_size=lissa_batch_size, seed=seed)
            solved = solve_lissa(matvec, rhs, damping, scale, lissa_depth)
            info["lissa_scale"] = scale
    pool_grads = per_example_gradients(model, loss_fn, pool_inputs, pool_targets, params, dtype=dtype)
    scores = (pool_grads @ solved.to(pool_grads.dtype)).double().cpu().numpy()
    return (scores, info) if return_info else scores


def largest_eigenvalue(matvec: MatVec, n_params: int, dtype: torch.dtype, iterations: int = 50,
                       seed: int = 0, device: torch.device | str = "cpu") -> float:
    """Power-iteration estimate of the largest-magnitude eigenvalue of a symmetric operator (whose vectors
    live on ``device``; the start vector is drawn on the CPU so that the estimate does not depend on it)."""
    vector = torch.randn(n_params, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    value = 0.0
    for _ in range(iterations):
        vector = vector / vector.norm()
        product = matvec(vector)
        value = float((vector * product).sum())
        vector = product
    return abs(value)
