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
The M test examples' (and K target steps') adjoints are stacked as rows and pushed through each step's
update, recorded by autograd with its batch gradient's graph, in one vectorised (``vmap``) backward pass per
step (double backward through the model: Hessian-vector products of the batch loss, all rows at once).
When every step's recorded graph fits in ``memory`` the forward replay keeps them and nothing is recomputed;
otherwise the state is stored every ``checkpoint_every`` steps and one segment at a time is recomputed with
its graphs. Computation runs on ``device`` (CUDA when asked; the CPU by default).

Optimizers: ``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay), ``Adam`` and ``AdamW``
(weight decay, ``decoupled_weight_decay``), ``maximize`` for both, and :mod:`simfluence.optim`'s Adam / AdamW
(eps inside the square root: smooth training), as returned by ``task.make_optimizer``;
their update is reproduced operation by operation and, like the generator, the replay runs on one thread with
deterministic algorithms, so :func:`replay_losses` in the task's own precision gives the logged losses bit for
bit. Differentiation runs in float64 by default (model and floating data converted), attention by its math
kernel (the fused CPU kernels have no second derivative). Models whose training forward pass changes buffers
(BatchNorm running statistics) are not supported. Randomness in the model (dropout) is replayed with the
run's torch seed (CPU generator); insertion effects of such a model use fresh random masks.

Cost: one replay (plus one recomputation when the graphs do not fit), and per step one vectorised
vector-Jacobian product for all K * M rows (each about a Hessian-vector product of the batch loss: the part
that grows with the number of tests); insertion effects add per-example gradients of the whole pool and an
(n_pool x n_params) @ (n_params x K * M) product per insertion step. Memory: the K * M adjoint rows (each the
size of the parameters and optimizer state) and the kept graphs. Measured in benchmarks/RESULTS.md.

Many tests (``cotangent_rank=k``, opt-in): the backward pass is linear in the cotangent it starts from (each step's
vector-Jacobian product is taken at the fixed base trajectory, Adam's state included), so pulling back an
orthonormal basis U of the top-k singular subspace of the test-gradient matrix G (n_params x M) and mapping the
results with ``U^T G`` gives exactly the effects of the projected gradients ``U U^T g_z``: k rows instead of M,
exact when k >= rank G, and as good as the fraction of each ``g_z`` the subspace captures otherwise.
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
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

import simfluence.optim
from simfluence.attribution.gradients import auto_chunk_size, twice_differentiable
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
    captured_energy : (K, n_test) with a ``cotangent_rank``: the fraction ``||U^T g_z||^2 / ||g_z||^2`` of each test
        gradient at each target step inside the differentiated subspace U (1: its effects are exact); None when
        every test gradient was differentiated itself.
    """

    curriculum: Curriculum
    target_steps: np.ndarray
    occurrence: np.ndarray
    insertion_steps: np.ndarray
    insertion: np.ndarray
    losses: np.ndarray
    optimizer: dict = field(default_factory=dict)
    captured_energy: np.ndarray | None = None

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
    """``torch.optim.SGD`` / ``Adam`` / ``AdamW`` as a pure function, op for op as their single-tensor step, and
    :mod:`simfluence.optim`'s Adam / AdamW (eps inside the square root) by their own
    :func:`~simfluence.optim.adam_update`.

    ``update(params, state, grads, lr, n_updates)`` returns the new (params, state); ``n_updates`` is the number
    of updates made before (SGD's momentum buffer starts as the first gradient, Adam's bias correction).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> None:
        cls = type(optimizer)
        if cls is torch.optim.SGD:
            self.kind = "sgd"
        elif cls is torch.optim.Adam or cls is torch.optim.AdamW:
            self.kind = "adam"
        elif cls is simfluence.optim.Adam or cls is simfluence.optim.AdamW:
            self.kind = "adam_root"
        else:
            raise SimfluenceError(
                f"unrolled differentiation supports torch.optim.SGD, Adam, AdamW and simfluence.optim.Adam / "
                f"AdamW; the task's make_optimizer returned {cls.__module__}.{cls.__qualname__}")
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
        if self.kind == "adam_root":
            beta1, beta2 = group["betas"]
            return {"beta1": _scalar(beta1), "beta2": _scalar(beta2), "eps": _scalar(group["eps"]),
                    "eps_root": _scalar(group["eps_root"]), "weight_decay": _scalar(group["weight_decay"]),
                    "decoupled": bool(group["decoupled_weight_decay"]), "maximize": maximize}
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
            if self.kind in ("adam", "adam_root"):
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
            elif self.kind == "adam_root":
                new_param, exp_avg, exp_avg_sq = simfluence.optim.adam_update(
                    param, *state[name], gradient, lr=lr, beta1=hyper["beta1"], beta2=hyper["beta2"],
                    eps=hyper["eps"], eps_root=hyper["eps_root"], weight_decay=hyper["weight_decay"],
                    decoupled=hyper["decoupled"], step=n_updates + 1)
                new_params[name], new_state[name] = new_param, (exp_avg, exp_avg_sq)
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


def _on(tensor: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device | None) -> torch.Tensor:
    tensor = _as_dtype(tensor, dtype)
    return tensor if device is None else tensor.to(device)


def _tree_map(function: Callable, *trees: Any) -> Any:
    """``function`` applied leaf by leaf to trees of dicts and tuples of tensors with the same structure."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: _tree_map(function, *(tree[key] for tree in trees)) for key in first}
    if isinstance(first, tuple):
        return tuple(_tree_map(function, *leaves) for leaves in zip(*trees, strict=True))
    return function(*trees)


@dataclass
class _Linearization:
    """One update recorded by autograd at its state: its inputs (leaves) and outputs, graph kept."""

    params: Tree
    opt_state: Tree
    weights: torch.Tensor
    grads: Tree
    new_params: Tree
    new_state: Tree


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
                 dtype: torch.dtype | None, chunk_size: int | None, device: str | torch.device | None = None) -> None:
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
        if device is not None:
            model = model.to(device)
        self.model = model
        self.pool_inputs, self.pool_targets = (_on(task.pool_inputs, dtype, device),
                                               _on(task.pool_targets, dtype, device))
        self.test_inputs, self.test_targets = (_on(task.test_inputs, dtype, device),
                                               _on(task.test_targets, dtype, device))
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
        self.rows_per_pass: int | None = None  # adjoint rows per vectorised backward pass (None: all)

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
        index = torch.tensor(batch, device=self.pool_inputs.device)
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

    def test_cotangents(self, state: _State,
                        rank: int | None = None) -> tuple[Tree, Tree, tuple[np.ndarray, np.ndarray] | None]:
        """Cotangents of the test losses at ``state``: their parameter gradients, zero optimizer state.

        With ``rank``: instead of the n_test gradients (the rows of G, (n_test, n_params)), the top ``rank`` right
        singular vectors of G (orthonormal rows U^T spanning what G's rows mostly span), and as third value the
        coefficients ``G U`` (n_test, rank) that map their effects back to the tests' (the backward pass is linear
        in its cotangent: exact where ``g_z`` lies in the span, always when ``rank >= rank(G)``) with the captured
        energy ``||U^T g_z||^2 / ||g_z||^2`` (n_test,) (1 for a zero gradient). Without: None.
        """
        flat = torch.cat([grads for _, grads in self.per_example_grads(state.params, self.test_inputs,
                                                                       self.test_targets, training=False)])
        low_rank = None
        if rank is not None:
            # G^T = Q R (reduced QR of a tall matrix), then the small SVD R^T = U S W^T: G = U S (Q W)^T, so Q W
            # holds G's right singular vectors (an SVD of the wide G directly costs ~20x more here)
            orthonormal, triangular = torch.linalg.qr(flat.T)
            _, _, right = torch.linalg.svd(triangular.T)
            basis = (orthonormal @ right[:rank].T).T
            coefficients = (flat @ basis.T).to(torch.float64)
            total = flat.to(torch.float64).square().sum(dim=1)
            kept = coefficients.square().sum(dim=1)
            energy = torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), 1.0).clamp(max=1.0)
            low_rank = (coefficients.cpu().numpy(), energy.cpu().numpy())
            flat = basis
        zeros = _tree_map(lambda value: value.new_zeros((len(flat), *value.shape)), state.opt_state)
        return _unflatten(flat, state.params), zeros, low_rank

    def insertion_effects(self, state: _State, mu: Tree, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, (chunk, R))`` blocks of ``mu . grad loss_i / batch_size`` for every pool example i."""
        mu_flat = _flatten(mu, self.optimizer.names, batch_dims=1)  # (R, n_params)
        for start, grads in self.per_example_grads(state.params, self.pool_inputs, self.pool_targets, training=True):
            yield start, (grads @ mu_flat.T / float(batch_size)).detach().cpu().numpy()

    def linearize(self, state: _State, step: int) -> tuple[_State, _Linearization | None]:
        """The state after ``step`` and the step's update recorded at ``state`` (None: an empty batch).

        One forward and backward pass of the batch with its graph kept (``create_graph``, for the double
        backward of :meth:`pullback`) and one optimizer update; the new state equals :meth:`advance`'s.
        """
        batch = self.batch(step)
        if batch.size == 0:
            return state, None
        inputs, targets, weights = self._batch_data(batch)
        if not self.buffers_checked:
            self._check_buffers(state.params, inputs)
        params = {name: value.detach().requires_grad_() for name, value in state.params.items()}
        opt_state = _tree_map(lambda value: value.detach().requires_grad_(), state.opt_state)
        weights = weights.requires_grad_()
        with torch.enable_grad(), torch.random.fork_rng(devices=[]), _mode(self.model, True):
            torch.set_rng_state(state.rng)
            loss = self.batch_loss(params, weights, inputs, targets, batch.size)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True,
                                                         allow_unused=True, materialize_grads=True), strict=True))
            rng = torch.get_rng_state()
            new_params, new_state = self.optimizer.update(params, opt_state, grads, float(self.task.lr_at(step)),
                                                          state.n_updates)
        after = _State(_tree_map(torch.Tensor.detach, new_params), _tree_map(torch.Tensor.detach, new_state),
                       state.n_updates + 1, rng)
        return after, _Linearization(params, opt_state, weights, grads, new_params, new_state)

    @staticmethod
    def pullback(linear: _Linearization, lam_params: Tree, lam_state: Tree, want_mu: bool,
                 rows_per_pass: int | None = None) -> tuple[Tree, Tree, torch.Tensor, Tree | None]:
        """Pull row cotangents on the state after a step back through its recorded update: one vectorised
        (vmap) backward pass through the kept graph for all rows, or for ``rows_per_pass`` rows at a time.

        Returns
        -------
        lam_params, lam_state : (R, ...) cotangents on the parameters / optimizer state before the step.
        d_weights : (R, batch) derivative with respect to each occurrence weight of the batch.
        mu : (R, ...) cotangent on the step's gradient (``want_mu``), else None.
        """
        outputs = [*_leaves(linear.new_params), *_leaves(linear.new_state)]
        cotangents = [*_leaves(lam_params), *_leaves(lam_state)]
        used = [index for index, output in enumerate(outputs) if output.requires_grad]
        inputs = [*_leaves(linear.params), *_leaves(linear.opt_state), linear.weights]
        if want_mu:
            inputs += _leaves(linear.grads)
        def pull(*rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            found = torch.autograd.grad([outputs[index] for index in used], inputs, rows, retain_graph=True,
                                        allow_unused=True)
            return tuple(torch.zeros_like(value_input) if value is None else value
                         for value, value_input in zip(found, inputs, strict=True))

        found = vmap(pull, chunk_size=rows_per_pass)(*(cotangents[index] for index in used))
        n_params, n_state = len(_leaves(linear.params)), len(_leaves(linear.opt_state))
        lam_params = _unleaves(linear.params, found[:n_params])
        lam_state = _unleaves(linear.opt_state, found[n_params:n_params + n_state])
        d_weights = found[n_params + n_state]
        mu = _unleaves(linear.grads, found[n_params + n_state + 1:]) if want_mu else None
        return lam_params, lam_state, d_weights, mu

    def step_vjp(self, state: _State, step: int, lam_params: Tree, lam_state: Tree,
                 want_mu: bool) -> tuple[Tree, Tree, torch.Tensor, Tree | None]:
        """Pull row cotangents on the state after ``step`` back to the state before it (:meth:`linearize`, then
        :meth:`pullback`; a non-empty batch)."""
        _, linear = self.linearize(state, step)
        return self.pullback(linear, lam_params, lam_state, want_mu, self.rows_per_pass)


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
    device: str | torch.device | None = None,
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
    device : where the replay computes (e.g. ``"cuda"``); None: where the task's model is built (the CPU).

    Returns
    -------
    (T + 1, n_test) float64 test losses after every step (step 0 first).
    """
    with single_thread_deterministic() if deterministic else contextlib.nullcontext():
        replay = _Replay(task, curriculum, task.init_seed if init_seed is None else int(init_seed), seed, dtype,
                         None, device)
        state = replay.start()
        losses = [replay.test_losses(state.params)]
        for step in range(1, curriculum.n_steps + 1):
            state = replay.advance(state, step)
            losses.append(replay.test_losses(state.params))
    return np.stack(losses)


MEMORY_BYTES = 2**30  # default memory budget of the kept linearisations (graphs) of the backward pass


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
    device: str | torch.device | None = None,
    memory: int = MEMORY_BYTES,
    cotangent_rank: int | None = None,
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
    dtype : compute precision (default float64: model and floating data converted); None: the task's own
        (float32 for the built-in workloads: about twice as fast, derivatives to about 1e-4 relative).
    checkpoint_every : recompute in segments of this many steps from states stored every this many steps;
        default: no recomputation at all when every step's linearisation (its kept graph) fits in ``memory``,
        else the segment length that fits.
    chunk_size : examples per vectorised pass of per-example gradients (default: about 64 MiB).
    deterministic : run as the generator trains: one thread, deterministic algorithms; False keeps torch's
        thread settings (faster for large models; needed on CUDA unless ``CUBLAS_WORKSPACE_CONFIG`` is set).
    progress : show a progress bar over the backward pass.
    replay_check : called with the replayed test losses (T + 1, n_test) after the forward pass, before the
        costly backward one; whatever it raises stops the computation (e.g. :func:`~simfluence.task.check_replay`
        against the logged run: a task that does not reproduce the run has no derivatives worth computing).
    device : where to compute (e.g. ``"cuda"``); None: where the task's model is built (the CPU). Random layers
        (dropout) draw from the run's seed on the CPU only.
    memory : bytes of kept linearisations (graphs of the batch gradients and updates) allowed when
        ``checkpoint_every`` is None.
    cotangent_rank : None (exact: every test gradient is pulled back itself, n_test rows per target step), or
        k: pull back an orthonormal basis U of the top-k singular subspace of each target step's test-gradient
        matrix G (n_params x n_test) instead, k rows, and map the results back with ``U^T G``. The backward
        pass is linear in its cotangent, so this gives exactly the effects of the projected gradients
        ``U U^T g_z`` (exact for every test when k >= rank G); ``captured_energy`` says how much of each
        ``g_z`` that keeps. The pullback's cost falls from n_test to k rows per step.

    Returns
    -------
    UnrolledEffects with occurrence effects (n_entries, K, n_test), insertion effects
    (n_ins, n_pool, K, n_test; float32), the replayed losses (T + 1, n_test) and, with a ``cotangent_rank``, the
    captured energy (K, n_test).

    Raises
    ------
    SimfluenceError : an optimizer other than SGD / Adam / AdamW (the message names it), amsgrad, a model
        that changes its buffers in training mode, or steps out of range.

    Notes
    -----
    Cost: one forward replay that keeps each step's linearisation (a batch forward and backward pass with its
    graph, the update recorded) when they all fit in ``memory``, else a plain replay plus one recomputation of
    every segment; then per step one vectorised pullback of all K * M rows through the update and the batch
    gradient (a double backward: K * M Hessian-vector products of the batch loss, batched).
    """
    targets = target_step_list(target_steps, curriculum.n_steps)
    insertions = insertion_step_list(insertion_steps, curriculum)
    if checkpoint_every is not None and int(checkpoint_every) < 1:
        raise SimfluenceError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if task.n_test == 0:
        raise SimfluenceError("the task has no test examples to differentiate")
    if cotangent_rank is not None and (isinstance(cotangent_rank, bool) or int(cotangent_rank) != cotangent_rank
                                       or cotangent_rank < 1):
        raise SimfluenceError(f"cotangent_rank must be None (exact) or an int >= 1, got {cotangent_rank!r}")
    with single_thread_deterministic() if deterministic else contextlib.nullcontext(), twice_differentiable():
        replay = _Replay(task, curriculum, task.init_seed if init_seed is None else int(init_seed), seed, dtype,
                         chunk_size, device)
        every = _segment_length(replay, checkpoint_every, memory)
        keep = {*targets, *(step - 1 for step in insertions)}
        states, linears, losses = _forward(replay, every, keep)
        if replay_check is not None:
            replay_check(losses)
        occurrence, insertion, energy = _backward(replay, states, linears, every, targets, insertions, progress,
                                                  None if cotangent_rank is None else int(cotangent_rank))
    return UnrolledEffects(curriculum=curriculum, target_steps=np.asarray(targets, dtype=np.int64),
                           occurrence=occurrence, insertion_steps=np.asarray(insertions, dtype=np.int64),
                           insertion=insertion, losses=losses, optimizer=replay.optimizer.describe(),
                           captured_energy=energy)


def _segment_length(replay: _Replay, checkpoint_every: int | None, memory: int) -> int:
    """Steps per recomputed segment: ``checkpoint_every``, else as many linearisations as fit in ``memory``;
    sets ``replay.rows_per_pass`` so that one vectorised backward pass takes about half of ``memory`` (passes
    over fewer rows cost more time: split only when needed).

    A linearisation's size is estimated on the first non-empty step: five copies of the state (parameters,
    optimizer state, gradient and the update's intermediates) and three of every module output of the batch's
    forward pass (activations saved for the first and second backward pass); a row of a backward pass, ten
    module outputs and four states.
    """
    n_steps = max(replay.curriculum.n_steps, 1)
    non_empty = np.flatnonzero(replay.curriculum.batch_sizes > 0)
    if non_empty.size == 0:
        return n_steps if checkpoint_every is None else int(checkpoint_every)
    outputs = [0]

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        outputs[0] += sum(leaf.numel() * leaf.element_size() for leaf in _leaves(output)
                          if isinstance(leaf, torch.Tensor))

    inputs, _, _ = replay._batch_data(replay.batch(int(non_empty[0]) + 1))
    handles = [module.register_forward_hook(count) for module in replay.model.modules()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _mode(replay.model, True):
            replay._outputs(replay.initial_params, inputs)
    finally:
        for handle in handles:
            handle.remove()
    state = replay.start()
    state_bytes = sum(value.numel() * value.element_size()
                      for value in (*state.params.values(), *_leaves(state.opt_state)))
    replay.rows_per_pass = max(1, (memory // 2) // max(10 * outputs[0] + 4 * state_bytes, 1))
    if checkpoint_every is not None:
        return int(checkpoint_every)
    per_step = 5 * state_bytes + 3 * outputs[0]
    return int(min(n_steps, max(1, memory // max(per_step, 1))))


def _unleaves(like: Any, leaves: list[Any]) -> Any:
    """The tree shaped like ``like`` whose leaves, in :func:`_leaves` order, are ``leaves``."""
    queue = iter(leaves)
    return _tree_map(lambda _: next(queue), like)


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, (tuple, list)):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def _forward(replay: _Replay, every: int,
             keep: set[int]) -> tuple[dict[int, _State], dict[int, _Linearization], np.ndarray]:
    """Replay the run: (T + 1, n_test) test losses, the states after the steps in ``keep`` and every ``every``
    steps (and at step 0), and, when one segment covers the run, every step's linearisation."""
    n_steps = replay.curriculum.n_steps
    state = replay.start()
    states = {0: state}
    linears: dict[int, _Linearization] = {}
    linearize = every >= n_steps
    losses = np.empty((n_steps + 1, replay.task.n_test))
    losses[0] = replay.test_losses(state.params)
    for step in range(1, n_steps + 1):
        if linearize:
            state, linear = replay.linearize(state, step)
            if linear is not None:
                linears[step] = linear
        else:
            state = replay.advance(state, step)
        losses[step] = replay.test_losses(state.params)
        if step % every == 0 or step in keep:
            states[step] = state
    return states, linears, losses


def _backward(replay: _Replay, states: dict[int, _State], linears: dict[int, _Linearization], every: int,
              targets: list[int], insertions: list[int], progress: bool,
              rank: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Adjoint pass, one segment of ``every`` steps at a time (its linearisations recomputed from its first
    state unless the forward pass kept them), last first.

    The adjoint's rows are blocks of ``width`` rows, one block per target step at or after the current step
    (``active``, increasing); a target's block starts as its test-loss gradients when the pass reaches it (n_test
    rows), or with a ``rank`` as an orthonormal basis of their top singular subspace (``min(rank, n_test)`` rows),
    whose effects are mapped back to the tests' at the end. Returns the occurrence and insertion effects and,
    with a ``rank``, the captured energy (K, n_test).
    """
    curriculum, n_test, n_pool = replay.curriculum, replay.task.n_test, replay.task.n_pool
    offsets, sizes = curriculum.offsets, curriculum.batch_sizes
    width = n_test if rank is None else min(rank, n_test, replay.n_params)
    occurrence = np.zeros((curriculum.n_entries, len(targets), width))
    insertion = np.zeros((len(insertions), n_pool, len(targets), width), dtype=np.float32)
    coefficients = np.zeros((len(targets), n_test, width))  # test gradients in each target block's basis
    energy = np.ones((len(targets), n_test))
    insertion_row = {step: row for row, step in enumerate(insertions)}
    target_index = {step: k for k, step in enumerate(targets)}
    active: list[int] = []
    lam_params: Tree = {}
    lam_state: Tree = {}
    last = targets[-1]
    with tqdm(total=last, desc="unrolled backward", unit="step", disable=not progress) as bar:
        for segment_start in range((last - 1) // every * every, -1, -every):
            segment_stop = min(segment_start + every, last)
            steps = range(segment_start + 1, segment_stop + 1)
            if any(step not in linears and sizes[step - 1] > 0 or step in target_index and step not in states
                   for step in steps):
                state = states[segment_start]
                for step in steps:
                    state, linear = replay.linearize(state, step)
                    states[step] = state
                    if linear is not None:
                        linears[step] = linear
            for step in range(segment_stop, segment_start, -1):
                if step in target_index:
                    block, zeros, low_rank = replay.test_cotangents(states[step], None if rank is None else width)
                    if low_rank is not None:
                        coefficients[target_index[step]], energy[target_index[step]] = low_rank
                    if active:
                        lam_params = _tree_map(lambda new, old: torch.cat([new, old]), block, lam_params)
                        lam_state = _tree_map(lambda new, old: torch.cat([new, old]), zeros, lam_state)
                    else:
                        lam_params, lam_state = block, zeros
                    active.insert(0, target_index[step])
                if sizes[step - 1] > 0:
                    lam_params, lam_state, d_weights, mu = replay.pullback(
                        linears.pop(step), lam_params, lam_state, step in insertion_row, replay.rows_per_pass)
                    rows = d_weights.detach().to(torch.float64).cpu().numpy()  # (R, batch)
                    occurrence[offsets[step - 1]:offsets[step], active[0]:, :] = \
                        rows.reshape(len(active), width, -1).transpose(2, 0, 1)
                    if mu is not None:
                        out = insertion[insertion_row[step]]
                        for start, block in replay.insertion_effects(states[step - 1], mu, int(sizes[step - 1])):
                            out[start:start + len(block), active[0]:, :] = block.reshape(len(block), len(active),
                                                                                          width)
                states.pop(step, None)  # no longer needed
                bar.update()
    if rank is None:
        return occurrence, insertion, None
    occurrence = np.einsum("ekb,kzb->ekz", occurrence, coefficients)
    insertion = np.einsum("ipkb,kzb->ipkz", insertion, coefficients.astype(np.float32)).astype(np.float32)
    return occurrence, insertion, energy


def _unflatten(flat: torch.Tensor, like: Tree) -> Tree:
    """(n, n_params) rows as a tree of (n, *shape) tensors shaped like ``like``."""
    parts = torch.split(flat, [value.numel() for value in like.values()], dim=-1)
    return {name: part.reshape(flat.shape[0], *value.shape) for (name, value), part in zip(like.items(), parts,
                                                                                           strict=True)}
