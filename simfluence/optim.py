"""Adam / AdamW with epsilon inside the square root: the optimizer of smooth ("metasmooth") training.

torch's Adam divides by ``sqrt(v_hat) + eps``. Where a parameter's gradients are tiny or absent (a token the
model never saw, a dead unit) ``v_hat`` is near 0, the step is ``m_hat / eps`` and its derivative with respect
to the data scales like ``1 / eps``: a training run is then a chaotic function of its data weights, and
first-order attribution (``unrolled``, influence) predicts nothing (Engstrom et al. 2025, "Optimizing ML
training with metagradient descent"; MAGIC, Ilyas & Engstrom 2025). Putting ``eps_root`` inside the square
root bounds the denominator below by ``sqrt(eps_root)`` and makes the step a smooth function of the gradient:

    m_t = beta1 m_{t-1} + (1 - beta1) g_t            v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    m_hat = m_t / (1 - beta1^t)                      v_hat = v_t / (1 - beta2^t)
    theta_t = theta_{t-1} (1 - lr wd) - lr m_hat / (sqrt(v_hat + eps_root) + eps)      (decoupled decay)

This is the form of ``torchopt.adamw(eps, eps_root)`` (and ``optax.scale_by_adam``), which EleutherAI's
bergson trains its MAGIC / metasmoothness runs with (``eps_root`` on the bias-corrected second moment, ``eps``
outside). With ``eps_root = 0`` it is torch's AdamW (the same arithmetic, not the same rounding). The update
is one pure function, :func:`adam_update`, shared by :class:`Adam` / :class:`AdamW` and by the replay of
:mod:`simfluence.attribution.unrolled`, so a replay reproduces a run bit for bit.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from simfluence.errors import SimfluenceError

__all__ = ["Adam", "AdamW", "adam_update", "DEFAULT_EPS_ROOT"]

DEFAULT_EPS_ROOT = 1e-6  # the eps-inside value quoted with MAGIC's GPT-2 results (bergson's replication: 1e-8)


def _sqrt(value: torch.Tensor, eps_root: float) -> torch.Tensor:
    """sqrt(value + eps_root); with eps_root = 0, a sqrt whose derivative at 0 is 0 (not inf), same values."""
    if eps_root > 0:
        return torch.sqrt(value + eps_root)
    positive = value > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, value, torch.ones_like(value))),
                       torch.zeros_like(value))


def adam_update(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, gradient: torch.Tensor, *,
                lr: float, beta1: float, beta2: float, eps: float, eps_root: float, weight_decay: float,
                decoupled: bool, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam(W) step with ``eps_root`` inside the square root, as a pure function (no in-place operation).

    Parameters
    ----------
    param, exp_avg, exp_avg_sq, gradient : tensors of one parameter's shape: its value, first and second moment
        before the step, and its gradient.
    lr, beta1, beta2, eps, eps_root, weight_decay : hyper-parameters (see :class:`Adam`).
    decoupled : weight decay applied to the parameter (AdamW) instead of added to the gradient (Adam, L2).
    step : the number of this step, 1 for the first (bias correction).

    Returns
    -------
    (param, exp_avg, exp_avg_sq) after the step, each of ``param``'s shape.
    """
    if weight_decay != 0:
        if decoupled:
            param = param * (1 - lr * weight_decay)
        else:
            gradient = torch.add(gradient, param, alpha=weight_decay)
    exp_avg = torch.lerp(exp_avg, gradient, 1 - beta1)
    exp_avg_sq = torch.addcmul(exp_avg_sq * beta2, gradient, gradient, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = _sqrt(exp_avg_sq / (1 - beta2**step), eps_root) + eps
    return torch.addcdiv(param, exp_avg, denom, value=-step_size), exp_avg, exp_avg_sq


class Adam(torch.optim.Optimizer):
    """Adam with ``eps_root`` inside the square root: ``m_hat / (sqrt(v_hat + eps_root) + eps)``.

    A ``torch.optim.Optimizer``: parameter groups, ``state_dict`` / ``load_state_dict`` and the per-parameter
    state of torch's Adam (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints, TrackStar's second-moment
    correction and ``unrolled`` replays read it as they read torch's. :class:`AdamW` is the same with decoupled
    weight decay (as ``torch.optim.AdamW`` is ``torch.optim.Adam``).

    Parameters
    ----------
    params : parameters or parameter groups.
    lr : learning rate (the training engine sets it every step from ``task.lr_at``).
    betas : decay rates of the first and second moment.
    eps : added to the denominator outside the square root (torch's ``eps``); 0 by default.
    eps_root : added to the bias-corrected second moment inside the square root (default
        :data:`DEFAULT_EPS_ROOT`); the denominator is at least ``sqrt(eps_root) + eps``.
    weight_decay : decay rate: added to the gradient as L2 (Adam) or, with ``decoupled_weight_decay``,
        ``theta *= 1 - lr * weight_decay`` before the step (AdamW).
    decoupled_weight_decay : see ``weight_decay``.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 0.0, eps_root: float = DEFAULT_EPS_ROOT,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False) -> None:
        name = type(self).__name__
        for key, value in (("lr", lr), ("eps", eps), ("eps_root", eps_root), ("weight_decay", weight_decay)):
            if not value >= 0:
                raise SimfluenceError(f"{name} {key} must be >= 0, got {value}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise SimfluenceError(f"{name} betas must be two numbers in [0, 1), got {betas}")
        if eps == 0 and eps_root == 0:
            raise SimfluenceError(f"{name} needs eps > 0 or eps_root > 0 (the denominator is 0 where a gradient is 0)")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "eps_root": eps_root, "weight_decay": weight_decay,
                    "decoupled_weight_decay": bool(decoupled_weight_decay)}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; ``closure`` (re-evaluating the loss) as in torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise SimfluenceError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] = state["step"] + 1  # a new tensor: a state_dict taken earlier keeps its step
                new_param, state["exp_avg"], state["exp_avg_sq"] = adam_update(
                    param, state["exp_avg"], state["exp_avg_sq"], param.grad, lr=float(group["lr"]),
                    beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]), eps_root=float(group["eps_root"]),
                    weight_decay=float(group["weight_decay"]), decoupled=bool(group["decoupled_weight_decay"]),
                    step=int(state["step"].item()))
                param.copy_(new_param)
        return loss


class AdamW(Adam):
    """:class:`Adam` with decoupled weight decay (default 0.01): ``theta *= 1 - lr * weight_decay`` before the step."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 0.0, eps_root: float = DEFAULT_EPS_ROOT,
                 weight_decay: float = 0.01, decoupled_weight_decay: bool = True) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, eps_root=eps_root, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay)
