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

``iter_per_example_gradients`` yields the chunks one at a time, so a consumer (a random projection, a dot
product with test gradients) never needs the full matrix.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from simfluence.errors import SimfluenceError

__all__ = [
    "ParameterSelection",
    "auto_chunk_size",
    "iter_per_example_gradients",
    "last_layer",
    "per_example_gradients",
    "select_parameters",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CHUNK_BYTES = 64 * 2**20  # default memory budget of one chunk of per-example gradients
ParamSpec = Sequence[str] | Callable[[str, nn.Parameter], bool] | None


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


def _cast_inputs(inputs: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return inputs.to(dtype) if dtype is not None and inputs.is_floating_point() else inputs


def example_loss_function(
    model: nn.Module, loss_fn: LossFn, rest: dict[str, torch.Tensor]
) -> Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(params, x, y)``: scalar loss of one example (no batch dim) under ``params`` + the fixed ``rest``."""
    def loss_of_one(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, {**rest, **params}, (x.unsqueeze(0),))
        return loss_fn(outputs, y.unsqueeze(0)).sum()

    return loss_of_one


class _EvalMode:
    """Context manager: the model in eval mode, restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


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
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, grads)`` for consecutive chunks of examples; ``grads`` is (chunk, n_params).

    Parameters are those of :func:`per_example_gradients`.
    """
    if len(inputs) != len(targets):
        raise SimfluenceError(f"{len(inputs)} inputs but {len(targets)} targets")
    selection = select_parameters(model, params)
    if chunk_size is None:
        chunk_size = auto_chunk_size(selection.n_params, dtype or next(model.parameters()).dtype)
    if chunk_size < 1:
        raise SimfluenceError(f"chunk_size must be >= 1, got {chunk_size}")
    with _EvalMode(model):
        chosen, rest = _functional_state(model, selection, dtype)
        per_example = vmap(grad(example_loss_function(model, loss_fn, rest)), in_dims=(None, 0, 0))
        for start in range(0, len(inputs), chunk_size):
            stop = min(start + chunk_size, len(inputs))
            grads = per_example(chosen, _cast_inputs(inputs[start:stop], dtype), targets[start:stop])
            yield start, selection.flatten(grads, batch_dims=1)


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    params: ParamSpec = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    as_numpy: bool = False,
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

    Returns
    -------
    (n, n_params) gradients, columns in ``model.named_parameters()`` order of the selection.
    """
    selection = select_parameters(model, params)
    out_dtype = dtype if dtype is not None else next(model.parameters()).dtype
    out = torch.empty((len(inputs), selection.n_params), dtype=out_dtype)
    for start, grads in iter_per_example_gradients(model, loss_fn, inputs, targets, params, chunk_size, dtype):
        out[start:start + len(grads)] = grads
    return out.numpy() if as_numpy else out
