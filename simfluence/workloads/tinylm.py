"""A tiny decoder-only transformer language model and its per-example loss, for the ``facts`` workload.

Word-level: a sequence is a row of token ids, right-padded with ``PAD`` to a fixed width. Attention is
causal, so a real token never attends to the pads that follow it, and the loss masks every target equal
to ``IGNORE``: an example's loss is the same whatever else is in its batch and however far it is padded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional

__all__ = ["TinyLMConfig", "TinyLM", "token_nll", "PAD", "IGNORE"]

PAD = 0
IGNORE = -100


@dataclass(frozen=True)
class TinyLMConfig:
    """Sizes of a :class:`TinyLM`: vocabulary, longest sequence, width, depth, heads, MLP width."""

    vocab_size: int
    max_len: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256

    def describe(self) -> dict:
        """JSON description of the model (for run-set metadata)."""
        return {"kind": "tiny_lm", **asdict(self)}


class _Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a GELU MLP."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.norm_attention = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.norm_mlp = nn.LayerNorm(config.d_model)
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        q, k, v = self.qkv(self.norm_attention(hidden)).split(width, dim=-1)
        heads = (batch, length, self.n_heads, width // self.n_heads)
        q, k, v = (t.reshape(heads).transpose(1, 2) for t in (q, k, v))
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        hidden = hidden + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return hidden + self.down(functional.gelu(self.up(self.norm_mlp(hidden))))


class TinyLM(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, blocks, final norm, tied output layer.

    ``forward(tokens)`` maps (batch, length) int64 token ids to (batch, length, vocab_size) next-token logits.
    """

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model {config.d_model} is not a multiple of n_heads {config.n_heads}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        for embedding in (self.embed, self.position):
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        hidden = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            hidden = block(hidden)
        return self.norm(hidden) @ self.embed.weight.T


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(batch,) mean negative log-likelihood of each row's target tokens; targets equal to ``IGNORE`` are skipped.

    Parameters
    ----------
    logits : (batch, length, vocab) next-token logits.
    targets : (batch, length) int64 target ids, ``IGNORE`` where there is nothing to predict (pads, prompts).
    """
    nll = functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    counts = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return nll.sum(dim=1) / counts
