"""Per-example loss gradients of any ``nn.Module``, vectorised with ``torch.func``.

The engine behind every gradient-based attribution method. For a model, a per-example loss
``loss_fn(outputs, targets) -> (batch,)`` and n examples it returns the (n, n_params) matrix whose row i
is the gradient of example i's loss with respect to the chosen parameters, flattened in the order of
``model.named_parameters()``::

    grads = per_example_gradients(model, loss_fn, inputs, targets, params=last_layer(model))

Gradients come from ``vmap(grad(...))`` over ``functional_call`` (one batched pass instead of one backward
pass per example), computed in chunks of ``chunk_size`` examples so memory stays bounded; the optional
parameter subset (names or a predicate, e.g. the last layer only) shrinks the columns. The model is used in
eval mode (deterministic; no dropout) and left as it was found.

Fast path (``method="linear"``, chosen automatically by ``method="auto"`` when it applies): when every
chosen parameter is the weight or bias of an ``nn.Linear`` and the model is a tree of ``nn.Sequential``
containers whose other leaves act on each example separately (elementwise activations, dropout, flatten,
layer norm, convolutions; see :func:`gradient_method`), one batched forward pass records each chosen layer's
input a_i and one backward pass of the *summed* loss its output gradient delta_i; as examples do not
interact in the forward pass, example i's weight gradient is delta_i a_i^T and its bias gradient delta_i.
Models with batch-coupling layers (BatchNorm), non-Linear chosen parameters (Conv, LayerNorm), custom
``forward`` methods, shared weights or a Linear called twice use ``vmap``. Both paths give the same
columns in the same order.

``iter_per_example_gradients`` yields the chunks one at a time, so a consumer (a random projection, a dot
product with test gradients) never needs the full matrix.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from simfluence.errors import SimfluenceError

__all__ = [
    "METHODS",
    "ParameterSelection",
    "auto_chunk_size",
    "gradient_method",
    "iter_per_example_gradients",
    "last_layer",
    "model_device",
    "per_example_gradients",
    "select_parameters",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CHUNK_BYTES = 64 * 2**20  # default memory budget of one chunk of per-example gradients
ParamSpec = Sequence[str] | Callable[[str, nn.Parameter], bool] | None
METHODS = ("auto", "vmap", "linear")


@dataclass(frozen=True)
class ParameterSelection:
    """The parameters gradients are taken with respect to, and how they flatten into one vector.

    Attributes
    ----------
    names : parameter names, in ``model.named_parameters()`` order.
    shapes : their shapes.
    sizes : their element counts; the flat vector is their concatenation.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]

    @property
    def n_params(self) -> int:
        return int(sum(self.sizes))

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` views of a flat (n_params,) vector (or (..., n_params) batch)."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, list(self.sizes), dim=-1)
        return {name: part.reshape(*lead, *shape) for name, part, shape in zip(self.names, parts, self.shapes,
                                                                               strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate ``{name: tensor}`` (each with ``batch_dims`` leading dims) into (..., n_params)."""
        return torch.cat([tensors[name].reshape(*tensors[name].shape[:batch_dims], -1) for name in self.names],
                         dim=-1)


def select_parameters(model: nn.Module, params: ParamSpec = None) -> ParameterSelection:
    """Resolve a parameter subset.

    Parameters
    ----------
    model : the module.
    params : ``None`` (every parameter that requires grad), a sequence of parameter names, or a predicate
        ``params(name, parameter) -> bool``.
    """
    named = dict(model.named_parameters())
    if params is None:
        names = [name for name, p in named.items() if p.requires_grad]
    elif callable(params):
        names = [name for name, p in named.items() if params(name, p)]
    else:
        wanted = list(params)
        unknown = [name for name in wanted if name not in named]
        if unknown:
            raise SimfluenceError(f"model has no parameter {unknown[0]!r}; it has {', '.join(named)}")
        names = [name for name in named if name in set(wanted)]  # model order, whatever order was asked
    if not names:
        raise SimfluenceError("the parameter selection is empty")
    return ParameterSelection(
        names=tuple(names),
        shapes=tuple(named[name].shape for name in names),
        sizes=tuple(named[name].numel() for name in names),
    )


def last_layer(model: nn.Module) -> list[str]:
    """Names of the parameters of the model's last module that has parameters (e.g. the output Linear)."""
    owners = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    if not owners:
        raise SimfluenceError(f"{type(model).__name__} has no parameters")
    prefix = owners[-1]
    return [name for name, _ in model.named_parameters() if name.rpartition(".")[0] == prefix]


def _functional_state(
    model: nn.Module, selection: ParameterSelection, dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(selected params, everything else: frozen params and buffers), detached, optionally cast."""
    def cast(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    chosen = set(selection.names)
    params = {name: cast(p) for name, p in model.named_parameters() if name in chosen}
    rest = {name: cast(p) for name, p in model.named_parameters() if name not in chosen}
    rest.update({name: cast(b) for name, b in model.named_buffers()})
    return params, rest


def _cast_inputs(inputs: torch.Tensor, dtype: torch.dtype | None, device: torch.device | None = None) -> torch.Tensor:
    """``inputs`` on ``device`` (default: where they are), floating ones cast to ``dtype``."""
    inputs = inputs if device is None else inputs.to(device)
    return inputs.to(dtype) if dtype is not None and inputs.is_floating_point() else inputs


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without parameters): gradients are computed there."""
    return next((parameter.device for parameter in model.parameters()), torch.device("cpu"))


def example_loss_function(
    model: nn.Module, loss_fn: LossFn, rest: dict[str, torch.Tensor]
) -> Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(params, x, y)``: scalar loss of one example (no batch dim) under ``params`` + the fixed ``rest``."""
    def loss_of_one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, {**rest, **params}, (x.unsqueeze(0),))
        return loss_fn(outputs, y.unsqueeze(0)).sum()

    return loss_of_one


def twice_differentiable() -> contextlib.AbstractContextManager:
    """Attention computed by its math kernel: torch's fused CPU attention kernels have neither a second derivative
    nor a forward-mode one, which Hessian products (unrolled, influence functions) need."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class _EvalMode:
    """Context manager: the model in eval mode, restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


# Leaf modules that act on each example separately (no parameters of theirs may be chosen for the fast path).
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Dropout, nn.AlphaDropout,
)
_PER_EXAMPLE = (nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _NotApplicable(Exception):
    """The linear fast path cannot give this model's per-example gradients."""


def _per_example_leaf(module: nn.Module) -> bool:
    kind = type(module)
    if kind in _ELEMENTWISE:
        return not getattr(module, "inplace", False)  # an in-place activation would overwrite a Linear's output
    if kind is nn.Flatten:
        return module.start_dim >= 1  # start_dim 0 (or negative) could merge the batch dimension
    return kind in _PER_EXAMPLE


def _linear_plan(model: nn.Module, selection: ParameterSelection) -> dict[str, tuple[str, ...]]:
    """``{Linear module name: chosen attributes ("weight", "bias")}`` or :class:`_NotApplicable` with why."""
    modules = dict(model.named_modules())
    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    plan: dict[str, list[str]] = {}
    for name in selection.names:
        prefix, _, attr = name.rpartition(".")
        module = modules.get(prefix)
        if type(module) is not nn.Linear or attr not in ("weight", "bias"):
            raise _NotApplicable(f"parameter {name!r} is not the weight or bias of an nn.Linear")
        if uses[id(getattr(module, attr))] > 1:
            raise _NotApplicable(f"parameter {name!r} is shared between modules")
        plan.setdefault(prefix, []).append(attr)
    for name, module in modules.items():
        if type(module) in (nn.Sequential, nn.Linear) or _per_example_leaf(module):
            continue
        what = f"module {name!r}" if name else "the model"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise _NotApplicable(f"{what} is a {type(module).__name__}, which couples the examples of a batch")
        raise _NotApplicable(f"{what} ({type(module).__name__}) is not an nn.Sequential, an nn.Linear or a "
                             "known per-example layer")
    return {prefix: tuple(attrs) for prefix, attrs in plan.items()}


def gradient_method(model: nn.Module, params: ParamSpec = None, method: str = "auto") -> str:
    """The path :func:`per_example_gradients` takes: ``"linear"`` (outer products) or ``"vmap"``.

    ``method="auto"`` gives ``"linear"`` when the fast path applies (every chosen parameter belongs to an
    ``nn.Linear``; the model is ``nn.Sequential`` containers of Linear layers and per-example layers such
    as elementwise activations, dropout, flatten, LayerNorm, Conv; no BatchNorm, no shared parameters), else
    ``"vmap"``; ``method="linear"`` raises :class:`SimfluenceError` saying why when it does not apply.
    """
    if method not in METHODS:
        raise SimfluenceError(f"method must be one of {METHODS}, got {method!r}")
    if method == "vmap":
        return "vmap"
    try:
        _linear_plan(model, select_parameters(model, params))
    except _NotApplicable as exc:
        if method == "linear":
            raise SimfluenceError(f"the linear fast path does not apply: {exc}") from None
        return "vmap"
    return "linear"


def _linear_chunk(
    model: nn.Module,
    loss_fn: LossFn,
    chosen: dict[str, torch.Tensor],
    rest: dict[str, torch.Tensor],
    plan: dict[str, tuple[str, ...]],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    selection: ParameterSelection,
    out: torch.Tensor,
) -> None:
    """Write the (batch, n_params) per-example gradients into ``out`` from one forward and one backward pass."""
    modules = dict(model.named_modules())
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in captured:
                raise _NotApplicable(f"nn.Linear {name!r} is called more than once per forward pass")
            captured[name] = (args[0], output)
        return hook

    params = {name: tensor.detach().requires_grad_() for name, tensor in chosen.items()}
    handles = [modules[name].register_forward_hook(recorder(name)) for name in plan]
    try:
        with torch.enable_grad():
            losses = loss_fn(functional_call(model, {**rest, **params}, (inputs,)), targets)
    finally:
        for handle in handles:
            handle.remove()
    batch = len(inputs)
    if losses.shape != (batch,):
        raise _NotApplicable(f"loss_fn gave shape {tuple(losses.shape)} for a batch of {batch}, not ({batch},)")
    reached = [name for name in plan if name in captured and captured[name][1].requires_grad]
    deltas = dict(zip(reached, torch.autograd.grad(losses.sum(), [captured[name][1] for name in reached],
                                                    allow_unused=True), strict=True)) if reached else {}
    # each parameter's columns of ``out``, as (batch, *shape) strided views: results are written in place
    views = selection.unflatten(out)
    for name, attrs in plan.items():
        delta = deltas.get(name)
        for attr in attrs:
            view = views[f"{name}.{attr}" if name else attr]
            if delta is None:  # the layer's output does not reach the loss: zero gradient, as vmap gives
                view.zero_()
                continue
            if attr == "bias":
                view.copy_(delta if delta.dim() == 2 else delta.reshape(batch, -1, delta.shape[-1]).sum(dim=1))
                continue
            activations = captured[name][0].detach()
            if delta.dim() == 2:  # (batch, out) x (batch, in): an outer product per example
                torch.mul(delta[:, :, None], activations[:, None, :], out=view)
            else:  # extra positions (e.g. a sequence): sum the outer products over them
                view.copy_(torch.bmm(delta.reshape(batch, -1, delta.shape[-1]).transpose(1, 2),
                                     activations.reshape(batch, -1, activations.shape[-1])))


def auto_chunk_size(n_params: int, dtype: torch.dtype = torch.float32, budget: int = CHUNK_BYTES) -> int:
    """Examples per chunk so that one chunk of gradients takes about ``budget`` bytes (at least 1)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return max(1, budget // (max(n_params, 1) * itemsize))


def iter_per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: ParamSpec = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    method: str = "auto",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, grads)`` for consecutive chunks of examples; ``grads`` is (chunk, n_params), on the
    model's device.

    Parameters are those of :func:`per_example_gradients`.
    """
    return _iter_gradients(model, loss_fn, inputs, targets, params, chunk_size, dtype, method, None)


def _iter_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: ParamSpec,
    chunk_size: int | None,
    dtype: torch.dtype | None,
    method: str,
    out: torch.Tensor | None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`iter_per_example_gradients`, writing each chunk into ``out[start:stop]`` when ``out`` is given
    (else into a new tensor per chunk, which the consumer may keep)."""
    if len(inputs) != len(targets):
        raise SimfluenceError(f"{len(inputs)} inputs but {len(targets)} targets")
    selection = select_parameters(model, params)
    out_dtype = dtype if dtype is not None else next(model.parameters()).dtype
    if chunk_size is None:
        chunk_size = auto_chunk_size(selection.n_params, out_dtype)
    if chunk_size < 1:
        raise SimfluenceError(f"chunk_size must be >= 1, got {chunk_size}")
    plan = _linear_plan(model, selection) if gradient_method(model, params, method) == "linear" else None
    device = model_device(model)
    with _EvalMode(model):
        chosen, rest = _functional_state(model, selection, dtype)
        per_example = vmap(grad(example_loss_function(model, loss_fn, rest)), in_dims=(None, 0, 0))
        for start in range(0, len(inputs), chunk_size):
            stop = min(start + chunk_size, len(inputs))
            chunk_inputs = _cast_inputs(inputs[start:stop], dtype, device)
            chunk_targets = targets[start:stop].to(device)
            if plan is not None:
                chunk = out[start:stop] if out is not None else torch.empty((stop - start, selection.n_params),
                                                                            dtype=out_dtype, device=device)
                try:
                    _linear_chunk(model, loss_fn, chosen, rest, plan, chunk_inputs, chunk_targets, selection, chunk)
                except _NotApplicable as exc:  # found only when running the model: vmap from here on
                    if method == "linear":
                        raise SimfluenceError(f"the linear fast path does not apply: {exc}") from None
                    plan = None
                else:
                    yield start, chunk
                    continue
            grads = selection.flatten(per_example(chosen, chunk_inputs, chunk_targets), batch_dims=1)
            if out is not None:
                out[start:stop] = grads
                grads = out[start:stop]
            yield start, grads


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: ParamSpec = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    as_numpy: bool = False,
    method: str = "auto",
) -> torch.Tensor | np.ndarray:
    """Gradient of every example's loss with respect to the chosen parameters.

    Parameters
    ----------
    model : any module; its current parameters are used (not changed).
    loss_fn : ``loss_fn(outputs, targets) -> (batch,)`` per-example loss (``reduction='none'``).
    inputs, targets : (n, ...) examples; each is passed to the model as a batch of one.
    params : parameter subset: ``None`` (all trainable), names, or a predicate ``(name, param) -> bool``.
    chunk_size : examples per vectorised pass (bounds memory: chunk_size * n_params floats); default
        :func:`auto_chunk_size`, about 64 MiB of gradients per chunk.
    dtype : compute in this floating dtype (parameters and floating inputs cast), e.g. ``torch.float64``;
        default the model's own.
    as_numpy : return a numpy array instead of a tensor.
    method : ``"auto"`` (the linear fast path when :func:`gradient_method` says it applies, else vmap),
        ``"vmap"`` (always ``vmap(grad)``) or ``"linear"`` (the fast path; an error where it does not apply).
        The fast path assumes, as documented for ``loss_fn``, that example i's loss depends on example i only.

    Returns
    -------
    (n, n_params) gradients, columns in ``model.named_parameters()`` order of the selection; computed and
    returned on the model's device (a GPU when the model is on one; inputs are moved there chunk by chunk).
    """
    selection = select_parameters(model, params)
    out_dtype = dtype if dtype is not None else next(model.parameters()).dtype
    out = torch.empty((len(inputs), selection.n_params), dtype=out_dtype, device=model_device(model))
    for _ in _iter_gradients(model, loss_fn, inputs, targets, params, chunk_size, dtype, method, out):
        pass  # each chunk is written into its rows of ``out``
    return out.cpu().numpy() if as_numpy else out
