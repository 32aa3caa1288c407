"""Exact first-order data attribution by differentiating through a replay of one training run (unrolled).

Every (example, step) occurrence j of a run's curriculum gets a weight w_j in its batch's mean loss,

    loss of step t = (1 / |c_t|) * sum_{j in c_t} w_j * loss_j(theta_{t-1}),        base: every w_j = 1,

and the run is replayed exactly as :mod:`simfluence.training` trains it (same initial weights,
torch seed, optimizer, learning-rate schedule; an empty batch makes no update at all), with the optimizer
written as a pure function of (parameters, optimizer state, gradient). Reverse mode through the replay gives,
for every test example z at once and for chosen *target steps* s, the exact derivatives (MAGIC, Ilyas &
Engstrom 2025)

- ``dL_s(z) / dw_j`` for every occurrence j (the *occurrence effects*), and
- ``dL_s(z) / du_{i,t}`` for every pool example i at chosen *insertion steps* t, where example i enters
  batch t with weight u (absent in the base: u = 0) as ``(1 / |c_t|) * u * loss_i`` (the *insertion
  effects*): adding or moving an example is first order too.

The adjoint lambda_t = dL_s(z)/d(theta_t, optimizer state_t) runs backwards through each update's Jacobian;
at step t the cotangent on the step's gradient is mu_t, and ``dL_s(z)/dw_j = mu_t . grad loss_j / |c_t|``.
The M test examples' (and K target steps') adjoints are stacked as rows and pushed through one ``vmap`` of
``torch.func.vjp`` per step (double backward through the model: Hessian-vector products of the batch loss).
Memory is bounded by storing the state every ``checkpoint_every`` steps and recomputing the states of one
segment at a time.

Optimizers: ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay), ``Adam`` and ``AdamW``
(weight decay, ``decoupled_weight_decay``), ``maximize`` for both, as returned by ``task.make_optimizer``;
their update is reproduced operation by operation and, like the generator, the replay runs on one thread with
deterministic algorithms, so :func:`replay_losses` in the task's own precision gives the logged losses bit for
bit. Differentiation runs in float64 by default (model and floating data converted), attention by its math
kernel (the fused CPU kernels have no second derivative). Models whose training forward pass changes buffers
(BatchNorm running statistics) are not supported. Randomness in the model (dropout) is replayed with the
run's torch seed (CPU generator); insertion effects of such a model use fresh random masks.

Cost: one replay, one recomputation, and per step one vector-Jacobian product for all K * M rows (each about
a Hessian-vector product of the batch loss); insertion effects add per-example gradients of the whole pool
and an (n_pool x n_params) @ (n_params x K * M) product per insertion step.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap
from tqdm import tqdm

from simfluence.attribution.gradients import auto_chunk_size
from simfluence.curriculum import Curriculum
from simfluence.errors import SimfluenceError
from simfluence.task import Task
from simfluence.training import single_thread_deterministic

__all__ = ["UnrolledEffects", "insertion_step_list", "replay_losses", "target_step_list", "unrolled_effects"]

Tree = dict[str, Any]


@dataclass
class UnrolledEffects:
    """Derivatives of the test losses of one replayed run with respect to data weights.

    Attributes
    ----------
    curriculum : the replayed run's curriculum (n_steps = T).
    target_steps : (K,) steps s at which the test losses are differentiated, increasing, last = T.
    occurrence : (n_entries, K, n_test) ``dL_s(z) / dw_j`` for entry j of ``curriculum.ids``; zero for
        entries of steps after s.
    insertion_steps : (n_ins,) steps t with insertion effects.
    insertion : (n_ins, n_pool, K, n_test) ``dL_s(z) / du_{i,t}``: pool example i added to batch t with weight
        u (in ``(1 / |c_t|) * u * loss_i``), at u = 0.
    losses : (T + 1, n_test) float64 test losses of the replay at every step (step 0 first).
    optimizer : JSON description of the optimizer that was replayed.
    """

    curriculum: Curriculum
    target_steps: np.ndarray
    occurrence: np.ndarray
    insertion_steps: np.ndarray
    insertion: np.ndarray
    losses: np.ndarray
    optimizer: dict = field(default_factory=dict)

    def per_example(self) -> np.ndarray:
        """(n_pool, K, n_test) derivative of each test loss w.r.t. one weight shared by all occurrences of i."""
        n_entries, n_targets, n_test = self.occurrence.shape
        n_pool = self.insertion.shape[1]
        owner = sp.csr_matrix((np.ones(n_entries), (self.curriculum.ids, np.arange(n_entries))),
                              shape=(n_pool, n_entries))
        return np.asarray(owner @ self.occurrence.reshape(n_entries, -1)).reshape(n_pool, n_targets, n_test)


# ------------------------------------------------------------------------------------------ steps
def target_step_list(spec: str | int | Sequence[int], n_steps: int) -> list[int]:
    """Resolve a target-step option to sorted steps in 1..n_steps that always include the final one.

    ``"final"``: [T]; an int n: n evenly spaced steps ending at T; a sequence: those steps (plus T).
    """
    if n_steps < 1:
        raise SimfluenceError("the run has no steps to differentiate through")
    if isinstance(spec, str):
        if spec != "final":
            raise SimfluenceError(f"target_steps must be 'final', a number of steps or a list of steps, got {spec!r}")
        return [n_steps]
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        if spec < 1:
            raise SimfluenceError(f"target_steps must be >= 1 evenly spaced steps, got {spec}")
        count = min(int(spec), n_steps)
        return sorted({max(1, round(n_steps * k / count)) for k in range(1, count + 1)})
    steps = sorted({int(step) for step in spec} | {n_steps})
    if steps[0] < 1 or steps[-1] > n_steps:
        bad = steps[0] if steps[0] < 1 else steps[-1]
        raise SimfluenceError(f"target step {bad} outside 1..{n_steps}")
    return steps


def insertion_step_list(spec: str | Sequence[int], curriculum: Curriculum) -> list[int]:
    """Resolve an insertion-step option to sorted steps whose batch is not empty in the base run.

    ``"all"``: every such step; ``"ends"``: those among the first and the last ``ceil(T / 10)`` steps (moves
    to the start or the end of training); ``"none"``; or a list of steps. A step that is empty in the base
    run has no insertion effects (the base makes no update there): listing one is an error.
    """
    sizes = curriculum.batch_sizes
    non_empty = np.flatnonzero(sizes > 0) + 1
    if isinstance(spec, str):
        if spec == "all":
            return [int(step) for step in non_empty]
        if spec == "ends":
            width = math.ceil(curriculum.n_steps / 10)
            return [int(step) for step in non_empty if step <= width or step > curriculum.n_steps - width]
        if spec == "none":
            return []
        raise SimfluenceError(f"insertion_steps must be 'all', 'ends', 'none' or a list of steps, got {spec!r}")
    steps = sorted({int(step) for step in spec})
    for step in steps:
        if not 1 <= step <= curriculum.n_steps:
            raise SimfluenceError(f"insertion step {step} outside 1..{curriculum.n_steps}")
        if sizes[step - 1] == 0:
            raise SimfluenceError(f"insertion step {step} has an empty batch in the base run (no update to "
                                  "insert into)")
    return steps


# ------------------------------------------------------------------------------------------ optimizer
def _scalar(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class _FunctionalOptimizer:
    """``torch.optim.SGD`` / ``Adam`` / ``AdamW`` as a pure function, op for op as their single-tensor step.

    ``update(params, state, grads, lr, n_updates)`` returns the new (params, state); ``n_updates`` is the number
    of updates made before (SGD's momentum buffer starts as the first gradient, Adam's bias correction).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> None:
        cls = type(optimizer)
        if cls is torch.optim.SGD:
            self.kind = "sgd"
        elif cls is torch.optim.Adam or cls is torch.optim.AdamW:
            self.kind = "adam"
        else:
            raise SimfluenceError(
                f"unrolled differentiation supports torch.optim.SGD, Adam and AdamW; the task's make_optimizer "
                f"returned {cls.__module__}.{cls.__qualname__}")
        self.name = cls.__name__
        self.hyper: dict[str, dict[str, Any]] = {}
        for group in optimizer.param_groups:
            hyper = self._group_hyper(group, cls)
            for param in group["params"]:
                if not param.requires_grad:
                    continue
                if id(param) not in names:
                    raise SimfluenceError(f"the task's {self.name} optimizer holds a tensor that is not a parameter "
                                          "of its model")
                self.hyper[names[id(param)]] = hyper
        if not self.hyper:
            raise SimfluenceError(f"the task's {self.name} optimizer has no trainable parameters")

    def _group_hyper(self, group: dict, cls: type) -> dict[str, Any]:
        maximize = bool(group.get("maximize", False))
        if self.kind == "sgd":
            return {"momentum": _scalar(group.get("momentum", 0.0)), "dampening": _scalar(group.get("dampening", 0.0)),
                    "nesterov": bool(group.get("nesterov", False)),
                    "weight_decay": _scalar(group.get("weight_decay", 0.0)), "maximize": maximize}
        if group.get("amsgrad", False):
            raise SimfluenceError(f"unrolled differentiation does not support {self.name}(amsgrad=True)")
        beta1, beta2 = group["betas"]
        decoupled = bool(group.get("decoupled_weight_decay", cls is torch.optim.AdamW))
        return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "eps": _scalar(group["eps"]),
                "weight_decay": _scalar(group.get("weight_decay", 0.0)), "decoupled": decoupled,
                "maximize": maximize}

    @property
    def names(self) -> list[str]:
        return list(self.hyper)

    def describe(self) -> dict:
        """JSON description: the class and the hyper-parameters of each distinct parameter group."""
        groups = []
        for hyper in self.hyper.values():
            if hyper not in groups:
                groups.append(hyper)
        return {"optimizer": self.name, "groups": groups}

    def initial_state(self, params: Tree) -> Tree:
        """Zero state tensors: SGD's momentum buffer (if any), Adam's two moments."""
        state: Tree = {}
        for name, param in params.items():
            if self.kind == "adam":
                state[name] = (torch.zeros_like(param), torch.zeros_like(param))
            elif self.hyper[name]["momentum"] != 0:
                state[name] = (torch.zeros_like(param),)
            else:
                state[name] = ()
        return state

    def update(self, params: Tree, state: Tree, grads: Tree, lr: float, n_updates: int) -> tuple[Tree, Tree]:
        new_params: Tree = {}
        new_state: Tree = {}
        for name, param in params.items():
            hyper = self.hyper[name]
            gradient = -grads[name] if hyper["maximize"] else grads[name]
            if self.kind == "sgd":
                new_params[name], new_state[name] = self._sgd(param, state[name], gradient, hyper, lr, n_updates)
            else:
                new_params[name], new_state[name] = self._adam(param, state[name], gradient, hyper, lr, n_updates)
        return new_params, new_state

    @staticmethod
    def _sgd(param, state, gradient, hyper, lr, n_updates):
        if hyper["weight_decay"] != 0:
            gradient = torch.add(gradient, param, alpha=hyper["weight_decay"])
        momentum = hyper["momentum"]
        if momentum != 0:
            if n_updates == 0:
                buffer = gradient  # torch: the buffer starts as a copy of the first gradient
            else:
                buffer = torch.add(state[0] * momentum, gradient, alpha=1 - hyper["dampening"])
            gradient = torch.add(gradient, buffer, alpha=momentum) if hyper["nesterov"] else buffer
            state = (buffer,)
        return torch.add(param, gradient, alpha=-lr), state

    @staticmethod
    def _adam(param, state, gradient, hyper, lr, n_updates):
        exp_avg, exp_avg_sq = state
        beta1, beta2 = hyper["beta1"], hyper["beta2"]
        if hyper["weight_decay"] != 0:
            if hyper["decoupled"]:
                param = param * (1 - lr * hyper["weight_decay"])
            else:
                gradient = torch.add(gradient, param, alpha=hyper["weight_decay"])
        exp_avg = torch.lerp(exp_avg, gradient, 1 - beta1)
        exp_avg_sq = torch.addcmul(exp_avg_sq * beta2, gradient, gradient, value=1 - beta2)
        step = float(n_updates + 1)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = _safe_sqrt(exp_avg_sq) / bias_correction2_sqrt + hyper["eps"]
        return torch.addcdiv(param, exp_avg, denom, value=-step_size), (exp_avg, exp_avg_sq)


def _safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    """sqrt with derivative 0 (not inf) at 0: where Adam's second moment is 0 so is its first, and the
    denominator's change is of second order."""
    positive = value > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, value, torch.ones_like(value))),
                       torch.zeros_like(value))


# ------------------------------------------------------------------------------------------ replay
@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _tree_map(function: Callable, *trees: Any) -> Any:
    """``function`` applied leaf by leaf to trees of dicts and tuples of tensors with the same structure."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: _tree_map(function, *(tree[key] for tree in trees)) for key in first}
    if isinstance(first, tuple):
        return tuple(_tree_map(function, *leaves) for leaves in zip(*trees, strict=True))
    return function(*trees)


@dataclass
class _State:
    """Parameters, optimizer state, updates made so far and the torch RNG state, before some step."""

    params: Tree
    opt_state: Tree
    n_updates: int
    rng: torch.Tensor


class _Replay:
    """One run of a task, replayed functionally: the model, data, optimizer and the per-step update."""

    def __init__(self, task: Task, curriculum: Curriculum, init_seed: int, seed: int | None,
                 dtype: torch.dtype | None, chunk_size: int | None) -> None:
        if curriculum.n_pool is not None and curriculum.n_pool != task.n_pool:
            raise SimfluenceError(f"the curriculum is over {curriculum.n_pool} pool ids, the task has {task.n_pool}")
        if curriculum.ids.size and int(curriculum.ids.max()) >= task.n_pool:
            raise SimfluenceError(f"the curriculum uses pool id {int(curriculum.ids.max())}, outside "
                                  f"0..{task.n_pool - 1}")
        if getattr(task, "train_logged_run", None) is not None:
            raise SimfluenceError(f"the task ({type(task).__name__}) trains its runs with a loop of its own; unrolled "
                                  "differentiation replays the generator's loop only")
        self.task, self.curriculum, self.seed = task, curriculum, seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = task.make_model(init_seed)
        if dtype is not None:
            model = model.to(dtype)
        self.model = model
        self.pool_inputs, self.pool_targets = _as_dtype(task.pool_inputs, dtype), _as_dtype(task.pool_targets, dtype)
        self.test_inputs, self.test_targets = _as_dtype(task.test_inputs, dtype), _as_dtype(task.test_targets, dtype)
        named = dict(model.named_parameters())
        self.optimizer = _FunctionalOptimizer(task.make_optimizer(model.parameters()),
                                              {id(param): name for name, param in named.items()})
        self.frozen: Tree = {name: param.detach() for name, param in named.items() if name not in self.optimizer.hyper}
        self.frozen.update({name: buffer.detach().clone() for name, buffer in model.named_buffers()})
        self.initial_params: Tree = {name: named[name].detach().clone() for name in self.optimizer.names}
        self.n_params = sum(param.numel() for param in self.initial_params.values())
        param_dtype = next(iter(self.initial_params.values())).dtype
        self.chunk_size = auto_chunk_size(self.n_params, param_dtype) if chunk_size is None else int(chunk_size)
        if self.chunk_size < 1:
            raise SimfluenceError(f"chunk_size must be >= 1, got {chunk_size}")
        self.buffers_checked = not list(model.named_buffers())

    # -------------------------------------------------------------------- losses
    def _outputs(self, params: Tree, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**params, **self.frozen}, (inputs,))

    def batch_loss(self, params: Tree, weights: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                   size: int) -> torch.Tensor:
        """Weighted batch loss ``sum_j w_j loss_j / size`` (with all w = 1: the batch mean of the generator)."""
        losses = self.task.loss_fn(self._outputs(params, inputs), targets).reshape(-1)
        return (weights * losses).sum() / size

    def _example_loss(self, params: Tree, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.task.loss_fn(self._outputs(params, inputs[None]), targets[None]).sum()

    def test_losses(self, params: Tree) -> np.ndarray:
        """(n_test,) float64 test losses in eval mode (as the generator logs them)."""
        with _mode(self.model, False), torch.no_grad():
            losses = self.task.loss_fn(self._outputs(params, self.test_inputs), self.test_targets)
        return losses.detach().to(torch.float64).cpu().numpy().reshape(-1)

    def per_example_grads(self, params: Tree, inputs: torch.Tensor, targets: torch.Tensor,
                          training: bool) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, (chunk, n_params))`` flat per-example loss gradients, in chunks."""
        randomness = "different" if training else "error"
        per_example = vmap(grad(self._example_loss), in_dims=(None, 0, 0), randomness=randomness)
        with _mode(self.model, training):
            for start in range(0, len(inputs), self.chunk_size):
                stop = min(start + self.chunk_size, len(inputs))
                grads = per_example(params, inputs[start:stop], targets[start:stop])
                yield start, _flatten(grads, self.optimizer.names, batch_dims=1)

    # -------------------------------------------------------------------- one step
    def batch(self, step: int) -> np.ndarray:
        offsets = self.curriculum.offsets
        return self.curriculum.ids[offsets[step - 1]:offsets[step]]

    def start(self) -> _State:
        """The state before step 1 (RNG seeded as the generator seeds a run)."""
        with torch.random.fork_rng(devices=[]):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            rng = torch.get_rng_state()
        params = {name: value.clone() for name, value in self.initial_params.items()}
        return _State(params, self.optimizer.initial_state(params), 0, rng)

    def advance(self, state: _State, step: int) -> _State:
        """The state after ``step`` (no graph kept)."""
        batch = self.batch(step)
        if batch.size == 0:
            return state
        inputs, targets, weights = self._batch_data(batch)
        if not self.buffers_checked:
            self._check_buffers(state.params, inputs)
        with torch.random.fork_rng(devices=[]), _mode(self.model, True):
            torch.set_rng_state(state.rng)
            grads = grad(self.batch_loss)(state.params, weights, inputs, targets, batch.size)
            rng = torch.get_rng_state()
        with torch.no_grad():
            params, opt_state = self.optimizer.update(state.params, state.opt_state, grads,
                                                      float(self.task.lr_at(step)), state.n_updates)
        return _State(params, opt_state, state.n_updates + 1, rng)

    def _batch_data(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs, targets and unit occurrence weights of a batch of pool rows."""
        index = torch.tensor(batch)
        first = next(iter(self.initial_params.values()))
        weights = torch.ones(batch.size, dtype=first.dtype, device=first.device)
        return self.pool_inputs[index], self.pool_targets[index], weights

    def _check_buffers(self, params: Tree, inputs: torch.Tensor) -> None:
        """A training forward pass must not change the model's buffers (BatchNorm running statistics)."""
        before = {name: self.frozen[name].clone() for name, _ in self.model.named_buffers()}
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _mode(self.model, True):
            self._outputs(params, inputs)
        changed = [name for name, value in before.items() if not torch.equal(value, self.frozen[name])]
        for name, value in before.items():
            self.frozen[name] = value
        if changed:
            raise SimfluenceError(f"the model changes its buffer {changed[0]!r} in training mode (BatchNorm running "
                                  "statistics?); unrolled differentiation does not support such models")
        self.buffers_checked = True

    def test_cotangents(self, state: _State) -> tuple[Tree, Tree]:
        """Cotangents of the n_test test losses at ``state``: their parameter gradients, zero optimizer state."""
        flat = torch.cat([grads for _, grads in self.per_example_grads(state.params, self.test_inputs,
                                                                       self.test_targets, training=False)])
        n_test = len(self.test_inputs)
        zeros = _tree_map(lambda value: value.new_zeros((n_test, *value.shape)), state.opt_state)
        return _unflatten(flat, state.params), zeros

    def insertion_effects(self, state: _State, mu: Tree, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, (chunk, R))`` blocks of ``mu . grad loss_i / batch_size`` for every pool example i."""
        mu_flat = _flatten(mu, self.optimizer.names, batch_dims=1)  # (R, n_params)
        for start, grads in self.per_example_grads(state.params, self.pool_inputs, self.pool_targets, training=True):
            yield start, (grads @ mu_flat.T / float(batch_size)).detach().cpu().numpy()

    def step_vjp(self, state: _State, step: int, lam_params: Tree, lam_state: Tree,
                 want_mu: bool) -> tuple[Tree, Tree, torch.Tensor, Tree | None]:
        """Pull row cotangents on the state after ``step`` back to the state before it.

        Returns
        -------
        lam_params, lam_state : (R, ...) cotangents on the parameters / optimizer state before the step.
        d_weights : (R, batch) derivative with respect to each occurrence weight of the batch.
        mu : (R, ...) cotangent on the step's gradient (``want_mu``), else None.
        """
        batch = self.batch(step)
        inputs, targets, weights = self._batch_data(batch)
        lr = float(self.task.lr_at(step))

        def gradient(params: Tree, weights: torch.Tensor) -> Tree:
            return grad(self.batch_loss)(params, weights, inputs, targets, batch.size)

        with torch.random.fork_rng(devices=[]), _mode(self.model, True):
            torch.set_rng_state(state.rng)
            grads, gradient_vjp = vjp(gradient, state.params, weights)

        def update(params: Tree, opt_state: Tree, grads: Tree) -> tuple[Tree, Tree]:
            return self.optimizer.update(params, opt_state, grads, lr, state.n_updates)

        _, update_vjp = vjp(update, state.params, state.opt_state, grads)
        lam_direct, lam_state, mu = vmap(update_vjp)((lam_params, lam_state))
        lam_hessian, d_weights = vmap(gradient_vjp)(mu)
        lam_params = _tree_map(torch.add, lam_direct, lam_hessian)
        return lam_params, lam_state, d_weights, mu if want_mu else None


def _flatten(tree: Tree, names: Sequence[str], batch_dims: int) -> torch.Tensor:
    return torch.cat([tree[name].reshape(*tree[name].shape[:batch_dims], -1) for name in names], dim=-1)


# ------------------------------------------------------------------------------------------ public
def replay_losses(
    task: Task,
    curriculum: Curriculum,
    init_seed: int | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = torch.float64,
    deterministic: bool = True,
) -> np.ndarray:
    """Test losses of a functional replay of one run (the forward pass of :func:`unrolled_effects`).

    Parameters
    ----------
    task : the model, data, loss, optimizer and schedule.
    curriculum : the run's batches (pool rows of ``task``).
    init_seed : seed of the initial weights (default ``task.init_seed``).
    seed : the run's torch seed (``run.metadata["seed"]`` of a generated run; matters for random layers).
    dtype : compute precision (model and floating data converted); None keeps the task's own, which reproduces
        the losses :func:`~simfluence.training.generate_runs` logged.
    deterministic : replay as the generator trains: one thread, deterministic algorithms (and so the same
        rounding); False keeps torch's thread settings.

    Returns
    -------
    (T + 1, n_test) float64 test losses after every step (step 0 first).
    """
    with single_thread_deterministic() if deterministic else contextlib.nullcontext():
        replay = _Replay(task, curriculum, task.init_seed if init_seed is None else int(init_seed), seed, dtype,
                         None)
        state = replay.start()
        losses = [replay.test_losses(state.params)]
        for step in range(1, curriculum.n_steps + 1):
            state = replay.advance(state, step)
            losses.append(replay.test_losses(state.params))
    return np.stack(losses)


def unrolled_effects(
    task: Task,
    curriculum: Curriculum,
    target_steps: str | int | Sequence[int] = "final",
    insertion_steps: str | Sequence[int] = "none",
    init_seed: int | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = torch.float64,
    checkpoint_every: int | None = None,
    chunk_size: int | None = None,
    deterministic: bool = True,
    progress: bool = False,
    replay_check: Callable[[np.ndarray], object] | None = None,
) -> UnrolledEffects:
    """Exact derivatives of every test loss with respect to every data weight of one run (reverse mode).

    Parameters
    ----------
    task : the model, data, loss, optimizer and schedule (rows aligned with the curriculum's pool ids).
    curriculum : the base run's batches, T steps.
    target_steps : where the test losses are differentiated: ``"final"`` (step T), an int n (n evenly spaced
        steps ending at T) or a list of steps (T is always added).
    insertion_steps : ``"none"``, ``"all"`` (every non-empty step), ``"ends"`` (the first and last tenth of the
        steps) or a list of steps at which the derivative of adding each pool example is computed (costs one
        pass of per-example gradients over the pool per step, and n_pool * K * n_test numbers per step).
    init_seed : seed of the initial weights (default ``task.init_seed``).
    seed : the run's torch seed (random layers such as dropout); None: none set.
    dtype : compute precision (default float64: model and floating data converted); None: the task's own.
    checkpoint_every : store the state every this many steps and recompute in between (default about
        sqrt(T)): memory of about ``T / k + k`` states.
    chunk_size : examples per vectorised pass of per-example gradients (default: about 64 MiB).
    deterministic : run as the generator trains: one thread, deterministic algorithms; False keeps torch's
        thread settings (faster for large models).
    progress : show a progress bar over the backward pass.
    replay_check : called with the replayed test losses (T + 1, n_test) after the forward pass, before the
        costly backward one; whatever it raises stops the computation (e.g. :func:`~simfluence.task.check_replay`
        against the logged run: a task that does not reproduce the run has no derivatives worth computing).

    Returns
    -------
    UnrolledEffects with occurrence effects (n_entries, K, n_test), insertion effects
    (n_ins, n_pool, K, n_test; float32) and the replayed losses (T + 1, n_test).

    Raises
    ------
    SimfluenceError : an optimizer other than SGD / Adam / AdamW (the message names it), amsgrad, a model
        that changes its buffers in training mode, or steps out of range.
    """
    targets = target_step_list(target_steps, curriculum.n_steps)
    insertions = insertion_step_list(insertion_steps, curriculum)
    every = max(1, math.ceil(math.sqrt(curriculum.n_steps))) if checkpoint_every is None else int(checkpoint_every)
    if every < 1:
        raise SimfluenceError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if task.n_test == 0:
        raise SimfluenceError("the task has no test examples to differentiate")
    with single_thread_deterministic() if deterministic else contextlib.nullcontext(), _twice_differentiable():
        replay = _Replay(task, curriculum, task.init_seed if init_seed is None else int(init_seed), seed, dtype,
                         chunk_size)
        checkpoints, losses = _forward(replay, every)
        if replay_check is not None:
            replay_check(losses)
        occurrence, insertion = _backward(replay, checkpoints, every, targets, insertions, progress)
    return UnrolledEffects(curriculum=curriculum, target_steps=np.asarray(targets, dtype=np.int64),
                           occurrence=occurrence, insertion_steps=np.asarray(insertions, dtype=np.int64),
                           insertion=insertion, losses=losses, optimizer=replay.optimizer.describe())


def _twice_differentiable() -> contextlib.AbstractContextManager:
    """Attention computed by its math kernel: the fused CPU kernels have no second derivative."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _forward(replay: _Replay, every: int) -> tuple[dict[int, _State], np.ndarray]:
    """Replay the run: the state every ``every`` steps (and at step 0), and (T + 1, n_test) test losses."""
    n_steps = replay.curriculum.n_steps
    state = replay.start()
    checkpoints = {0: state}
    losses = np.empty((n_steps + 1, replay.task.n_test))
    losses[0] = replay.test_losses(state.params)
    for step in range(1, n_steps + 1):
        state = replay.advance(state, step)
        losses[step] = replay.test_losses(state.params)
        if step % every == 0:
            checkpoints[step] = state
    return checkpoints, losses


def _backward(replay: _Replay, checkpoints: dict[int, _State], every: int, targets: list[int],
              insertions: list[int], progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Adjoint pass, one segment of ``every`` steps at a time (recomputed from its checkpoint), last first.

    The adjoint's rows are blocks of n_test rows, one block per target step at or after the current step
    (``active``, increasing); a target's block starts as its test-loss gradients when the pass reaches it.
    """
    curriculum, n_test, n_pool = replay.curriculum, replay.task.n_test, replay.task.n_pool
    offsets, sizes = curriculum.offsets, curriculum.batch_sizes
    occurrence = np.zeros((curriculum.n_entries, len(targets), n_test))
    insertion = np.zeros((len(insertions), n_pool, len(targets), n_test), dtype=np.float32)
    insertion_row = {step: row for row, step in enumerate(insertions)}
    target_index = {step: k for k, step in enumerate(targets)}
    active: list[int] = []
    lam_params: Tree = {}
    lam_state: Tree = {}
    last = targets[-1]
    with tqdm(total=last, desc="unrolled backward", unit="step", disable=not progress) as bar:
        for segment_start in range((last - 1) // every * every, -1, -every):
            states = [checkpoints[segment_start]]
            for step in range(segment_start + 1, min(segment_start + every, last) + 1):
                states.append(replay.advance(states[-1], step))
            for position in range(len(states) - 1, 0, -1):
                step, before = segment_start + position, states[position - 1]
                if step in target_index:
                    block, zeros = replay.test_cotangents(states[position])
                    if active:
                        lam_params = _tree_map(lambda new, old: torch.cat([new, old]), block, lam_params)
                        lam_state = _tree_map(lambda new, old: torch.cat([new, old]), zeros, lam_state)
                    else:
                        lam_params, lam_state = block, zeros
                    active.insert(0, target_index[step])
                if sizes[step - 1] > 0:
                    lam_params, lam_state, d_weights, mu = replay.step_vjp(before, step, lam_params, lam_state,
                                                                           want_mu=step in insertion_row)
                    rows = d_weights.detach().to(torch.float64).cpu().numpy()  # (R, batch)
                    occurrence[offsets[step - 1]:offsets[step], active[0]:, :] = \
                        rows.reshape(len(active), n_test, -1).transpose(2, 0, 1)
                    if mu is not None:
                        out = insertion[insertion_row[step]]
                        for start, block in replay.insertion_effects(before, mu, int(sizes[step - 1])):
                            out[start:start + len(block), active[0]:, :] = block.reshape(len(block), len(active),
                                                                                          n_test)
                bar.update()
    return occurrence, insertion


def _unflatten(flat: torch.Tensor, like: Tree) -> Tree:
    """(n, n_params) rows as a tree of (n, *shape) tensors shaped like ``like``."""
    parts = torch.split(flat, [value.numel() for value in like.values()], dim=-1)
    return {name: part.reshape(flat.shape[0], *value.shape) for (name, value), part in zip(like.items(), parts,
                                                                                           strict=True)}
