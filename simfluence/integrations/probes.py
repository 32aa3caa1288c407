"""Per-example losses of a fixed probe (test) set, for the models people fine-tune.

A run set needs, at the logged steps, the loss of every test example on its own (not a batch mean).
:func:`causal_lm_losses` and :func:`classification_losses` turn logits and labels into per-example losses,
:class:`ProbeSet` evaluates a whole probe set on a model in evaluation mode, batch by batch. The model is
called like a Hugging Face model (``model(**inputs)``, labels left out) and may return a ``ModelOutput``, a
mapping with ``"logits"``, a tuple whose first element is the logits, or the logits themselves.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simfluence.integrations.sampler import ID_COLUMN

__all__ = ["ProbeSet", "causal_lm_losses", "classification_losses", "logits_of", "per_example_losses"]

IGNORE_INDEX = -100  # label value that Hugging Face losses skip (padding, prompt tokens)


def causal_lm_losses(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, the loss a Hugging Face causal LM computes per example.

    Token t's logits predict label t + 1 (the shift the model applies when given ``labels``); labels equal to
    ``ignore_index`` are skipped. A sequence with no label left has loss 0.

    Parameters
    ----------
    logits : (batch, seq_len, vocab) float.
    labels : (batch, seq_len) int, usually the input ids with padding set to ``ignore_index``.

    Returns
    -------
    (batch,) float32 per-example losses.
    """
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:].to(logits.device)
    token_losses = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, ignore_index=ignore_index,
                                   reduction="none")  # (batch, seq_len - 1)
    counts = (shifted_labels != ignore_index).sum(dim=1)
    return token_losses.sum(dim=1) / counts.clamp(min=1)


def classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example loss of a sequence-classification head: cross-entropy, or squared error for one output.

    Parameters
    ----------
    logits : (batch, n_labels) float; ``n_labels == 1`` is regression (Hugging Face's ``problem_type``
        ``"regression"``).
    labels : (batch,) class indices, or (batch,) float targets for regression.

    Returns
    -------
    (batch,) float32 per-example losses.
    """
    logits = logits.float()
    labels = labels.to(logits.device)
    if logits.shape[-1] == 1:
        return (logits.reshape(-1) - labels.float().reshape(-1)) ** 2
    return F.cross_entropy(logits, labels.long(), reduction="none")


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs: ``.logits``, ``["logits"]``, the first element of a tuple, or a tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, tuple | list) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find logits in model outputs of type {type(outputs).__name__}")
    return logits


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, kind: str = "auto") -> torch.Tensor:
    """(batch,) per-example losses for ``kind`` ``"causal_lm"``, ``"classification"`` or ``"auto"``.

    ``"auto"`` is causal LM when logits are (batch, seq_len, vocab) and labels (batch, seq_len), otherwise
    classification.
    """
    if kind == "auto":
        kind = "causal_lm" if logits.ndim == 3 and labels.ndim == 2 else "classification"
    if kind == "causal_lm":
        return causal_lm_losses(logits, labels)
    if kind == "classification":
        return classification_losses(logits, labels)
    raise ValueError(f"kind must be 'auto', 'causal_lm' or 'classification', got {kind!r}")


class ProbeSet:
    """A fixed set of probe examples; calling it on a model gives their per-example losses.

    Parameters
    ----------
    examples : the probe examples: a mapping of (n_probe, ...) tensors (an already collated batch, e.g. a
        tokenizer's output with ``labels``), or a sequence / map-style dataset of examples that ``collator``
        turns into such mappings.
    collator : ``collator(list_of_examples) -> mapping of tensors``; default ``torch``'s ``default_collate``.
        Not used for a mapping of tensors.
    batch_size : examples per forward pass.
    kind : ``"auto"``, ``"causal_lm"`` or ``"classification"`` (see :func:`per_example_losses`).
    label_name : key of the labels; they are not passed to the model.
    ignore_keys : further keys not passed to the model (the id column is always left out).

    Examples
    --------
    >>> probe = ProbeSet({"input_ids": ids, "attention_mask": mask, "labels": ids})
    >>> probe(model)           # (n_probe,) float64
    """

    def __init__(
        self,
        examples: Mapping[str, torch.Tensor] | Any,
        collator: Callable[[list], Mapping[str, torch.Tensor]] | None = None,
        batch_size: int = 64,
        kind: str = "auto",
        label_name: str = "labels",
        ignore_keys: tuple[str, ...] = (),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = examples
        self.collator = collator
        self.batch_size = batch_size
        self.kind = kind
        self.label_name = label_name
        self.ignore_keys = (*ignore_keys, ID_COLUMN)

    def __len__(self) -> int:
        if isinstance(self.examples, Mapping):
            return len(self.examples[self.label_name])
        return len(self.examples)

    def _batches(self) -> Any:
        n_probe = len(self)
        for start in range(0, n_probe, self.batch_size):
            stop = min(start + self.batch_size, n_probe)
            if isinstance(self.examples, Mapping):
                yield {key: value[start:stop] for key, value in self.examples.items()}
            else:
                collate = self.collator or torch.utils.data.default_collate
                yield collate([self.examples[index] for index in range(start, stop)])

    def __call__(self, model: nn.Module) -> np.ndarray:
        """(n_probe,) float64 loss of every probe example under ``model``, in evaluation mode without gradients.

        The model's train/eval mode is restored afterwards.
        """
        was_training = model.training
        device = next((parameter.device for parameter in model.parameters()), torch.device("cpu"))
        model.eval()
        losses = []
        try:
            with torch.no_grad():
                for batch in self._batches():
                    labels = batch[self.label_name]
                    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                              for key, value in batch.items() if key != self.label_name and key not in self.ignore_keys}
                    logits = logits_of(model(**inputs))
                    losses.append(per_example_losses(logits, labels.to(device), self.kind).double().cpu())
        finally:
            model.train(was_training)
        return torch.cat(losses).numpy() if losses else np.zeros(0)

    def __repr__(self) -> str:
        return f"ProbeSet(n_probe={len(self)}, batch_size={self.batch_size}, kind={self.kind!r})"
