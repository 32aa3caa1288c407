"""Seeded Gaussian random projection (Johnson-Lindenstrauss) that never materialises its matrix.

``GaussianProjection(n_params, dim, seed)`` stands for the matrix ``R / sqrt(dim)``, R an (n_params, dim)
matrix of independent standard normals, so ``<P a, P b>`` is an unbiased estimate of ``<a, b>`` with
standard deviation about ``|a| |b| sqrt(2 / dim)`` at worst. R is defined page by page: rows
``[p * page_rows, (p + 1) * page_rows)`` are drawn from a generator seeded with ``(seed, p)``, so any page
can be regenerated on its own, projecting touches one page (``page_rows * dim`` floats) at a time, and the
result does not depend on how the inputs were chunked. The same ``(n_params, dim, seed, page_rows)`` always
gives the same matrix.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from simfluence.errors import SimfluenceError

__all__ = ["GaussianProjection", "projected_gradients"]


class GaussianProjection:
    """Random projection ``x -> x @ R / sqrt(dim)`` from ``n_params`` to ``dim`` dimensions.

    Parameters
    ----------
    n_params : input dimension.
    dim : output dimension d.
    seed : seed of the matrix.
    page_rows : rows of R generated at once (part of the matrix's definition; memory ``page_rows * dim``).
    """

    def __init__(self, n_params: int, dim: int, seed: int = 0, page_rows: int = 1024) -> None:
        if n_params < 1 or dim < 1 or page_rows < 1:
            raise SimfluenceError(f"projection needs n_params, dim, page_rows >= 1, got {n_params}, {dim}, {page_rows}")
        self.n_params = int(n_params)
        self.dim = int(dim)
        self.seed = int(seed)
        self.page_rows = int(page_rows)

    def __repr__(self) -> str:
        return f"GaussianProjection(n_params={self.n_params}, dim={self.dim}, seed={self.seed})"

    @property
    def n_pages(self) -> int:
        return math.ceil(self.n_params / self.page_rows)

    def page(self, index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``[index * page_rows, ...)`` of R (unscaled standard normals), regenerated from the seed."""
        if not 0 <= index < self.n_pages:
            raise SimfluenceError(f"projection page {index} outside 0..{self.n_pages - 1}")
        state = np.random.SeedSequence([self.seed, index]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        rows = min(self.page_rows, self.n_params - index * self.page_rows)
        return torch.randn(rows, self.dim, generator=generator, dtype=torch.float64).to(dtype)

    def project(self, vectors: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Project (n, width) vectors holding coordinates ``[offset, offset + width)`` of the input space.

        With ``offset=0`` and ``width = n_params`` this is the full projection; blocks of coordinates
        projected separately add up to it (so parameters can be streamed in chunks).

        Returns
        -------
        (n, dim) tensor in the dtype of ``vectors``.
        """
        vectors = torch.as_tensor(vectors)
        if vectors.ndim != 2:
            raise SimfluenceError(f"project expects (n, width) vectors, got shape {tuple(vectors.shape)}")
        width = vectors.shape[1]
        if offset < 0 or offset + width > self.n_params:
            raise SimfluenceError(
                f"coordinates [{offset}, {offset + width}) outside the projection's {self.n_params} inputs"
            )
        out = torch.zeros(vectors.shape[0], self.dim, dtype=vectors.dtype)
        position = offset
        while position < offset + width:
            index = position // self.page_rows
            page_start = index * self.page_rows
            page = self.page(index, vectors.dtype)
            stop = min(page_start + page.shape[0], offset + width)
            out += vectors[:, position - offset:stop - offset] @ page[position - page_start:stop - page_start]
            position = stop
        return out / math.sqrt(self.dim)

    __call__ = project


def projected_gradients(
    model,
    loss_fn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    projection: GaussianProjection,
    params=None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(n, dim) projected per-example gradients; only ``chunk_size`` full gradients exist at a time.

    Parameters are those of :func:`~simfluence.attribution.gradients.per_example_gradients` plus the
    projection (whose ``n_params`` must match the parameter selection).
    """
    from simfluence.attribution.gradients import iter_per_example_gradients, select_parameters

    n_params = select_parameters(model, params).n_params
    if n_params != projection.n_params:
        raise SimfluenceError(f"projection is from {projection.n_params} dimensions, the gradients have {n_params}")
    chunks = [projection.project(grads.cpu()) for _, grads in
              iter_per_example_gradients(model, loss_fn, inputs, targets, params, chunk_size, dtype)]
    if not chunks:
        return torch.zeros(0, projection.dim)
    return torch.cat(chunks)
