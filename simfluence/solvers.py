"""Batched ridge solvers for the Simfluence design, all test examples at once.

Per test example m the Simfluence-Linear fit is a ridge regression whose design matrix is
``X_m = [diag(prev_m) F, F]`` (multiplicative and additive effects) or ``X_m = F`` (additive only),
where ``F`` is the (n_transitions, n_features) sparse feature matrix shared by every test example and
``prev_m`` its loss before each transition. The solvers exploit the sharing: every product is
``F @ W`` or ``F.T @ V`` with W, V holding all test examples as columns, so no Python loop runs over
test examples.

- ``direct``: exact normal equations. For additive models one factorisation serves every test; for
  multiplicative ones the per-test Gram matrices are assembled for a chunk of tests in one sparse
  product (pairs of features co-occurring in a transition) and solved as a batch.
- ``cg``: matrix-free conjugate gradient run on all test examples in parallel (one CG per column),
  with a 2x2 block-Jacobi preconditioner that pairs each feature's multiplicative and additive
  coefficient (they are strongly correlated because losses change slowly). With ``device`` set the same CG
  runs on torch tensors (CUDA when given a GPU).

Why no stronger preconditioner (``benchmarks/bench_precond.py``): after the 2x2 Jacobi the spectrum is a
Marchenko-Pastur bulk (random batches) whose lower edge approaches lam as the unknowns per test example
(2 x n_features) approach the transitions. Even the exact top-k eigenvectors of each test example's own matrix
(the best a rank-k Nystrom preconditioner could do) cut the iterations by under 2x at k = 300 of 1,400
unknowns, and a Kronecker ``S (x) F^T F`` preconditioner sharing the additive Gram does worse than the Jacobi.

The CG's cost is its sparse products (:class:`SparseProducts`): for ``kernel="auto"`` the faster of scipy's and
torch's CSR kernel timed at the start of the solve, torch on the cores the machine has free (one when it is
loaded: multi-threaded torch on oversubscribed cores is 3-5x slower). ``dtype=np.float32`` runs the CG in single
precision inside float64 iterative refinement, so the answer meets the same ``tol`` (on the float64 residual) as a
float64 solve; a loose ``tol`` (>= 1e-5) needs no refinement and never forms float64 copies of the losses.
Test examples are solved in blocks whose working set stays under ``_CG_BLOCK_BYTES``.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from simfluence.errors import SimfluenceError

_CHUNK_BYTES = 256 * 2**20
_CG_BLOCK_BYTES = 512 * 2**20
_SINGLE_INNER_TOL = 1e-5  # relative residual each single-precision correction solve aims for


class ConvergenceWarning(UserWarning):
    """Conjugate gradient stopped at ``max_iter`` before reaching its tolerance."""


@dataclass
class SolveInfo:
    """What a solve did: the solver used, CG iterations (the most of any test block), the worst relative
    residual, the product kernel and precision, the test blocks, the float64 refinement steps and the threads
    torch's kernel ran on (1 for scipy's)."""

    solver: str
    n_iter: int = 0
    max_residual: float = 0.0
    kernel: str = ""
    dtype: str = "float64"
    n_blocks: int = 1
    n_refine: int = 0
    threads: int = 1


def n_params(n_features: int, multiplicative: bool) -> int:
    """Unknowns per test example."""
    return 2 * n_features if multiplicative else n_features


def choose_solver(n_features: int, n_test: int, multiplicative: bool) -> str:
    """``direct`` when factoring is cheap, else ``cg``.

    Additive models share one Gram matrix across test examples, so a direct solve costs one
    factorisation of size n_features. Multiplicative models need one factorisation of size
    2 * n_features per test example; preconditioned CG converges in tens of iterations on real logs
    (measured on the digits workload: 20-70 iterations, 25x faster than the direct solve at 1,400
    unknowns per test), so the direct solve is kept for small problems only.
    """
    if not multiplicative:
        return "direct" if n_features <= 3000 else "cg"
    return "direct" if 2 * n_features <= 200 else "cg"


def solve_ridge(
    features: sp.csr_matrix,
    prev: np.ndarray,
    target: np.ndarray,
    penalty: np.ndarray,
    multiplicative: bool = True,
    solver: str = "auto",
    tol: float = 1e-10,
    max_iter: int = 5000,
    x0: np.ndarray | None = None,
    dtype: type = np.float64,
    kernel: str = "auto",
    device: str | None = None,
) -> tuple[np.ndarray, SolveInfo]:
    """Solve ``min_theta ||target_m - X_m theta_m||^2 + sum_j penalty_j theta_mj^2`` for every test m.

    Parameters
    ----------
    features : (n_transitions, n_features) sparse F, shared by all test examples.
    prev : (n_transitions, n_test) losses before each transition (regressor of the multiplicative part).
    target : (n_transitions, n_test) regression targets.
    penalty : (n_params,) ridge strength per unknown (``n_params = 2 * n_features`` if multiplicative,
        multiplicative block first), all > 0 or the problem must be well posed.
    multiplicative : include the ``diag(prev) F`` block.
    solver : ``"direct"``, ``"cg"`` or ``"auto"``.
    tol : CG stops when every column's residual norm is below ``tol`` times its right-hand side norm.
    max_iter : CG iteration cap (a ``ConvergenceWarning`` is issued when it is hit).
    x0 : (n_params, n_test) CG starting point (warm start).
    dtype : precision of the CG iterations, ``np.float64`` or ``np.float32`` (float64 refinement keeps ``tol``).
    kernel : sparse-product kernel of the numpy CG, ``"torch"``, ``"scipy"`` or ``"auto"`` (the faster here and now).
    device : ``None`` (default): the CG on numpy arrays; a torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``): the
        whole CG on torch tensors there (same preconditioner, blocks and refinement; needs torch). The direct
        solver ignores it.

    Returns
    -------
    theta : (n_params, n_test) float64; rows ``[:n_features]`` multiplicative (if any), then additive.
    info : :class:`SolveInfo`.
    """
    features = sp.csr_matrix(features, dtype=np.float64)
    if np.dtype(dtype) not in (np.float64, np.float32):
        raise SimfluenceError(f"dtype must be float64 or float32, got {np.dtype(dtype).name}")
    working = np.float32 if np.dtype(dtype) == np.float32 and tol >= _SINGLE_INNER_TOL else np.float64
    prev = np.asarray(prev, dtype=working)
    target = np.asarray(target, dtype=working)
    n_trans, n_features = features.shape
    if (target.ndim != 2 or prev.ndim != 2 or target.shape[0] != n_trans or prev.shape[0] != n_trans
            or prev.shape[1] == 0 or target.shape[1] % prev.shape[1]):
        raise SimfluenceError(
            f"shape mismatch: features {features.shape}, prev {prev.shape}, target {target.shape}"
        )
    size = n_params(n_features, multiplicative)
    penalty = np.broadcast_to(np.asarray(penalty, dtype=np.float64), (size,))
    if solver == "auto":
        solver = choose_solver(n_features, target.shape[1], multiplicative)
    if solver == "direct":
        prev, target = prev.astype(np.float64, copy=False), target.astype(np.float64, copy=False)
        if multiplicative and prev.shape[1] != target.shape[1]:
            prev = np.tile(prev, (1, target.shape[1] // prev.shape[1]))
        if multiplicative:
            return _direct_multiplicative(features, prev, target, penalty), SolveInfo("direct")
        return _direct_additive(features, target, penalty), SolveInfo("direct")
    if solver == "cg" and device is not None:
        if not torch_available():
            raise SimfluenceError(f"device={device!r} needs torch (pip install torch)")
        return _cg_torch(features, prev, target, penalty, multiplicative, tol, max_iter, x0, dtype, device)
    if solver == "cg":
        return _cg(features, prev, target, penalty, multiplicative, tol, max_iter, x0, dtype, kernel)
    raise SimfluenceError(f"unknown solver {solver!r} (use 'direct', 'cg' or 'auto')")


# ------------------------------------------------------------------------------------------ direct
def _direct_additive(features: sp.csr_matrix, target: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    gram = (features.T @ features).toarray()
    gram[np.diag_indices_from(gram)] += penalty
    rhs = np.asarray(features.T @ target)
    return scipy.linalg.solve(gram, rhs, assume_a="pos")


def pair_products(features: sp.csr_matrix) -> tuple[np.ndarray, sp.csr_matrix]:
    """Co-occurring feature pairs, so that ``F.T @ diag(w) @ F`` for many w is one sparse product.

    Returns
    -------
    keys : (n_pairs,) flat indices ``i * n_features + j`` of the (i, j) pairs that co-occur in a row.
    products : (n_pairs, n_transitions) csr with ``F[r, i] * F[r, j]`` at (pair, r); then
        ``(products @ W)[k, m] = (F.T diag(W[:, m]) F)[keys[k]]``.
    """
    features = features.tocsr()
    features.sum_duplicates()
    n_rows, n_features = features.shape
    per_row = np.diff(features.indptr)
    squares = per_row * per_row
    total = int(squares.sum())
    row = np.repeat(np.arange(n_rows), squares)
    start = np.repeat(features.indptr[:-1], squares)
    width = np.repeat(per_row, squares)
    k = np.arange(total) - np.repeat(np.cumsum(squares) - squares, squares)
    first = start + k // np.maximum(width, 1)
    second = start + k % np.maximum(width, 1)
    key = features.indices[first].astype(np.int64) * n_features + features.indices[second]
    keys, inverse = np.unique(key, return_inverse=True)
    products = sp.csr_matrix(
        (features.data[first] * features.data[second], (inverse.reshape(-1), row)),
        shape=(keys.size, n_rows),
    )
    return keys, products


def _direct_multiplicative(
    features: sp.csr_matrix, prev: np.ndarray, target: np.ndarray, penalty: np.ndarray
) -> np.ndarray:
    n_features = features.shape[1]
    n_test = target.shape[1]
    keys, products = pair_products(features)
    size = 2 * n_features
    chunk = max(1, min(n_test, _CHUNK_BYTES // (8 * size * size * 2)))
    theta = np.empty((size, n_test))
    rhs_mult = np.asarray(features.T @ (prev * target))
    rhs_add = np.asarray(features.T @ target)
    for lo in range(0, n_test, chunk):  # chunks of test examples bound memory; each chunk is one batch
        hi = min(n_test, lo + chunk)
        p = prev[:, lo:hi]
        weights = np.concatenate([p * p, p, np.ones((p.shape[0], 1))], axis=1)
        flat = np.asarray(products @ weights)  # (n_pairs, 2 * k + 1)
        k = hi - lo
        blocks = np.zeros((2 * k + 1, n_features * n_features))
        blocks[:, keys] = flat.T
        blocks = blocks.reshape(2 * k + 1, n_features, n_features)
        gram = np.empty((k, size, size))
        gram[:, :n_features, :n_features] = blocks[:k]
        gram[:, :n_features, n_features:] = blocks[k : 2 * k]
        gram[:, n_features:, :n_features] = blocks[k : 2 * k]
        gram[:, n_features:, n_features:] = blocks[2 * k]
        gram[:, np.arange(size), np.arange(size)] += penalty
        rhs = np.concatenate([rhs_mult[:, lo:hi], rhs_add[:, lo:hi]], axis=0).T[:, :, None]
        with threadpool_limits(1):  # many small solves: BLAS threads only contend (10-40x slower under load)
            theta[:, lo:hi] = np.linalg.solve(gram, rhs)[:, :, 0].T
    return theta


# ------------------------------------------------------------------------------------------ kernels
def torch_available() -> bool:
    """Whether torch can be imported (it is needed only for ``kernel="torch"``)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def choose_kernel(kernel: str = "auto") -> str:
    """``torch`` (multi-threaded CSR products) when importable, else ``scipy``; an explicit name is checked."""
    if kernel == "auto":
        return "torch" if torch_available() else "scipy"
    if kernel not in ("torch", "scipy"):
        raise SimfluenceError(f"unknown kernel {kernel!r} (use 'torch', 'scipy' or 'auto')")
    if kernel == "torch" and not torch_available():
        raise SimfluenceError("kernel='torch' needs torch (pip install torch)")
    return kernel


def free_cores() -> int:
    """Cores not taken by other work right now: the CPU count less the 1-minute load average, at least 1."""
    n_cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return n_cores
    return max(1, n_cores - int(load))


@contextlib.contextmanager
def _torch_threads(n_threads: int):
    """Run torch on ``n_threads`` threads inside the block, restoring its setting after."""
    import torch

    before = torch.get_num_threads()
    if n_threads != before:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        if n_threads != before:
            torch.set_num_threads(before)


class SparseProducts:
    """``F @ V`` and ``F.T @ U`` for one sparse F in one precision, with scipy or torch CSR kernels.

    scipy's kernel is single-threaded; torch's CSR x dense product is multi-threaded and 2-7x faster on 2 idle
    cores (float32 faster again), but 3-5x slower than scipy when the cores are oversubscribed (measured on 2
    shared cores at a load of 13: scipy 130 ms, torch on 1 thread 212 ms, on 2 threads 394 ms per product pair).
    torch therefore runs on ``threads`` threads (default: :func:`free_cores` when built, at most torch's own
    setting), set around each product only. Both return numpy arrays (zero-copy views of torch results); inputs
    are numpy arrays of the same dtype.
    """

    def __init__(self, features: sp.csr_matrix, dtype: type = np.float64, kernel: str = "auto",
                 threads: int | None = None) -> None:
        self.kernel = choose_kernel(kernel)
        self.dtype = np.dtype(dtype)
        self.shape = features.shape
        self.threads = 1
        forward = sp.csr_matrix(features, dtype=self.dtype)
        adjoint = forward.T.tocsr()
        if self.kernel == "torch":
            import torch

            self.threads = max(1, threads if threads is not None else min(torch.get_num_threads(), free_cores()))
            self._forward, self._adjoint = _torch_csr(forward), _torch_csr(adjoint)
        else:
            self._forward, self._adjoint = forward, adjoint

    def forward(self, dense: np.ndarray) -> np.ndarray:
        """``F @ dense``: (n_features, k) -> (n_rows, k)."""
        return self._product(self._forward, dense)

    def adjoint(self, dense: np.ndarray) -> np.ndarray:
        """``F.T @ dense``: (n_rows, k) -> (n_features, k)."""
        return self._product(self._adjoint, dense)

    def _product(self, matrix, dense: np.ndarray) -> np.ndarray:
        dense = np.ascontiguousarray(dense, dtype=self.dtype)
        if self.kernel == "scipy":
            return np.asarray(matrix @ dense)
        import torch

        with _torch_threads(self.threads):
            return torch.sparse.mm(matrix, torch.from_numpy(dense)).numpy()


def fastest_products(features: sp.csr_matrix, dtype: type, kernel: str = "auto", width: int = 64) -> SparseProducts:
    """:class:`SparseProducts` with the given kernel, or for ``"auto"`` the faster of scipy and torch here and now.

    torch runs on the cores free now (:func:`free_cores`, one on a loaded machine), and ``"auto"`` times one
    forward and one adjoint product of each kernel (``width`` columns, best of three, the kernels alternating so
    that a change of load hits both) and keeps the faster.
    """
    if kernel != "auto" or not torch_available():
        return SparseProducts(features, dtype, choose_kernel(kernel))
    probe = np.ones((features.shape[1], width), dtype=dtype)
    candidates = [SparseProducts(features, dtype, name) for name in ("scipy", "torch")]
    seconds = [np.inf] * len(candidates)
    for _ in range(3):
        for index, products in enumerate(candidates):
            start = time.perf_counter()
            products.adjoint(products.forward(probe))
            seconds[index] = min(seconds[index], time.perf_counter() - start)
    return candidates[int(np.argmin(seconds))]


def _torch_csr(matrix: sp.csr_matrix):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(np.int64)), torch.from_numpy(matrix.indices.astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray(matrix.data)), size=matrix.shape, check_invariants=False,
        )


# ------------------------------------------------------------------------------------------ CG
class _NormalOperator:
    """``theta -> X_m^T X_m theta + penalty * theta`` for a block of test examples, and its preconditioner.

    Unknowns are laid out as (n_features, k, n_block): k = 2 (multiplicative, additive) or 1 (additive), so
    one sparse product of width ``k * n_block`` serves both halves.
    """

    def __init__(self, products: SparseProducts, prev: np.ndarray | None, penalty: np.ndarray,
                 squared: sp.csr_matrix) -> None:
        self.products = products
        dtype = products.dtype
        self.prev = None if prev is None else np.ascontiguousarray(prev, dtype=dtype)
        n_features = products.shape[1]
        self.k = 1 if prev is None else 2
        self.penalty = np.ascontiguousarray(penalty.reshape(self.k, n_features).T[:, :, None], dtype=dtype)
        blocks = [block.astype(dtype) for block in _jacobi_blocks(squared, prev, self.penalty)]
        if prev is None:
            self.inverse_diagonal = blocks[0]
        else:
            self.inv_a, self.inv_b, self.inv_d = blocks

    def rhs(self, target: np.ndarray) -> np.ndarray:
        target = np.ascontiguousarray(target, dtype=self.products.dtype)
        if self.prev is None:
            return self.products.adjoint(target)[:, None, :]
        return self._adjoint_pair(self.prev * target, target)

    def _adjoint_pair(self, weighted: np.ndarray, plain: np.ndarray) -> np.ndarray:
        n_rows, n_cols = plain.shape
        stacked = np.empty((n_rows, 2, n_cols), dtype=self.products.dtype)
        stacked[:, 0], stacked[:, 1] = weighted, plain
        return self.products.adjoint(stacked.reshape(n_rows, 2 * n_cols)).reshape(-1, 2, n_cols)

    def apply(self, v: np.ndarray) -> np.ndarray:
        n_features, k, n_cols = v.shape
        fv = self.products.forward(v.reshape(n_features, k * n_cols))
        if self.prev is None:
            out = self.products.adjoint(fv)[:, None, :]
        else:  # in place: fv = [F v_m | F v_a] becomes [prev * u | u], u = prev * F v_m + F v_a
            fv = fv.reshape(-1, 2, n_cols)
            np.multiply(self.prev, fv[:, 0], out=fv[:, 0])
            fv[:, 1] += fv[:, 0]
            np.multiply(self.prev, fv[:, 1], out=fv[:, 0])
            out = self.products.adjoint(fv.reshape(-1, 2 * n_cols)).reshape(-1, 2, n_cols)
        out += self.penalty * v
        return out

    def precondition(self, r: np.ndarray, out: np.ndarray) -> np.ndarray:
        if self.prev is None:
            return np.multiply(r, self.inverse_diagonal[:, :, None], out=out)
        r_m, r_a = r[:, 0], r[:, 1]
        np.multiply(self.inv_a, r_m, out=out[:, 0])
        out[:, 0] += self.inv_b * r_a
        np.multiply(self.inv_d, r_a, out=out[:, 1])
        out[:, 1] += self.inv_b * r_m
        return out


def _jacobi_blocks(squared: sp.csr_matrix, prev: np.ndarray | None, penalty: np.ndarray) -> list[np.ndarray]:
    """The preconditioner's float64 entries: ``[1 / diagonal]`` (additive) or the inverse 2x2 blocks
    ``[inv_a, inv_b, inv_d]`` (each (n_features, n_cols)) pairing every feature's multiplicative and additive
    coefficient (they are strongly correlated because losses change slowly). ``squared``: (n_features,
    n_transitions) ``F.T`` squared entrywise; ``penalty``: (n_features, k, 1)."""
    counts = np.asarray(squared.sum(axis=1))  # (n_features, 1): sum_r F[r, j]^2
    penalty = np.asarray(penalty, dtype=np.float64)
    if prev is None:
        diagonal = counts + penalty[:, 0]
        return [1.0 / np.where(diagonal > 0, diagonal, 1.0)]
    prev64 = np.asarray(prev, dtype=np.float64)
    block_a = squared @ (prev64 * prev64) + penalty[:, 0]
    block_b = squared @ prev64
    block_d = counts + penalty[:, 1]
    det = block_a * block_d - block_b * block_b
    det = np.where(det > 0, det, 1.0)
    return [block_d / det, -block_b / det, block_a / det]


def _column_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-test inner products of two (n_features, k, n_cols) arrays, accumulated in float64."""
    return np.einsum("ijk,ijk->k", a, b, dtype=np.float64)


def _pcg(operator: _NormalOperator, rhs: np.ndarray, x: np.ndarray, tol: float, max_iter: int,
         rhs_norm: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Preconditioned CG on every column at once, from ``x`` (updated in place) until ``|r| <= tol |rhs_norm|``."""
    residual = rhs - operator.apply(x) if np.any(x) else rhs.copy()
    z = operator.precondition(residual, np.empty_like(residual))
    direction = z.copy()
    rz = _column_dot(residual, z)
    rel = np.sqrt(_column_dot(residual, residual)) / rhs_norm
    step_buffer = np.empty_like(x)
    n_iter = 0
    while rel.max(initial=0.0) > tol and n_iter < max_iter:
        product = operator.apply(direction)
        curvature = _column_dot(direction, product)
        step = np.divide(rz, curvature, out=np.zeros_like(rz), where=curvature > 0).astype(x.dtype)
        x += np.multiply(direction, step, out=step_buffer)
        residual -= np.multiply(product, step, out=step_buffer)
        operator.precondition(residual, z)
        rz_new = _column_dot(residual, z)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0).astype(x.dtype)
        direction *= beta
        direction += z
        rz = rz_new
        rel = np.sqrt(_column_dot(residual, residual)) / rhs_norm
        n_iter += 1
    return x, n_iter, rel


def _warn_if_unconverged(n_iter: int, worst: float, tol: float) -> None:
    """The :class:`ConvergenceWarning` of a CG (numpy or torch) whose worst relative residual stayed above tol."""
    if worst > tol:
        warnings.warn(
            f"conjugate gradient stopped after {n_iter} iterations with relative residual {worst:.2e} "
            f"> tol {tol:.0e}; raise max_iter or the ridge strength",
            ConvergenceWarning,
            stacklevel=4,
        )


def _cg(
    features: sp.csr_matrix,
    prev: np.ndarray,
    target: np.ndarray,
    penalty: np.ndarray,
    multiplicative: bool,
    tol: float,
    max_iter: int,
    x0: np.ndarray | None,
    dtype: type,
    kernel: str,
) -> tuple[np.ndarray, SolveInfo]:
    """Block-by-block (bounded memory) PCG; float32 runs single-precision CG inside float64 refinement."""
    n_trans, n_features = features.shape
    n_test = target.shape[1]
    k = 2 if multiplicative else 1
    single = np.dtype(dtype) == np.float32
    refine = single and tol < _SINGLE_INNER_TOL  # a tolerance float32 alone cannot promise
    itemsize = 4 if single else 8
    per_column = itemsize * (n_trans * (3 + 2 * k) + n_features * k * 9) + (16 * n_trans if refine else 0)
    block = max(1, min(n_test, _CG_BLOCK_BYTES // max(per_column, 1)))
    squared = features.multiply(features).T.tocsr()
    fast = fastest_products(features, dtype, kernel, width=min(k * n_test, 2 * k * block, 256))
    kernel = fast.kernel
    exact = SparseProducts(features, np.float64, kernel) if refine else fast
    theta = np.empty((k, n_features, n_test))
    start = None if x0 is None else np.asarray(x0, dtype=np.float64).reshape(k, n_features, n_test)
    n_iter, worst, n_refine = 0, 0.0, 0
    for lo in range(0, n_test, block):  # test examples are independent: blocks bound the working memory
        cols = slice(lo, min(n_test, lo + block))
        p = None
        if multiplicative:
            p = prev[:, cols] if prev.shape[1] == n_test else prev[:, np.arange(lo, cols.stop) % prev.shape[1]]
        op_fast = _NormalOperator(fast, p, penalty, squared)
        op_exact = _NormalOperator(exact, p, penalty, squared) if refine else op_fast
        rhs = op_exact.rhs(target[:, cols])
        rhs_norm = np.sqrt(_column_dot(rhs, rhs))
        rhs_norm = np.where(rhs_norm > 0, rhs_norm, 1.0)
        x = (np.zeros_like(rhs) if start is None
             else np.ascontiguousarray(start[:, :, cols].transpose(1, 0, 2), dtype=rhs.dtype))
        if not refine:
            x, used, rel = _pcg(op_fast, rhs, x, tol, max_iter, rhs_norm)
        else:  # iterative refinement: float64 residuals, float32 corrections (each gains ~5 digits)
            used, previous = 0, np.inf
            while True:
                residual = rhs - op_exact.apply(x) if np.any(x) else rhs.copy()
                scale = np.sqrt(_column_dot(residual, residual))
                rel = scale / rhs_norm
                if rel.max(initial=0.0) <= tol or used >= max_iter:
                    break
                if rel.max() > 0.1 * previous:  # single precision stalls (very ill-conditioned): finish in float64
                    x, more, rel = _pcg(op_exact, rhs, x, tol, max_iter - used, rhs_norm)
                    used += more
                    break
                previous = float(rel.max())
                scale = np.where(scale > 0, scale, 1.0)
                inner_tol = max(_SINGLE_INNER_TOL, tol / float(rel.max()))
                correction = np.zeros(residual.shape, dtype=np.float32)
                correction, inner, _ = _pcg(op_fast, (residual / scale).astype(np.float32), correction, inner_tol,
                                            max_iter - used, np.ones_like(scale))
                x += correction * scale
                used += inner
                n_refine += 1
        n_iter = max(n_iter, used)
        worst = max(worst, float(rel.max(initial=0.0)))
        theta[:, :, cols] = x.transpose(1, 0, 2)
    _warn_if_unconverged(n_iter, worst, tol)
    info = SolveInfo("cg", n_iter, worst, kernel=kernel, dtype=np.dtype(dtype).name, n_blocks=-(-n_test // block),
                     n_refine=n_refine, threads=fast.threads)
    return theta.reshape(k * n_features, n_test), info


# ------------------------------------------------------------------------------------------ CG on torch
def _column_dot_torch(a, b):
    """Per-test inner products of two (n_features, k, n_cols) tensors, accumulated in float64."""
    return (a * b).sum(dim=(0, 1), dtype=_torch().float64)


def _torch():
    import torch

    return torch


class _TorchNormalOperator:
    """:class:`_NormalOperator` on torch tensors of one device and precision (the same layout and preconditioner)."""

    def __init__(self, forward, adjoint, prev, penalty: np.ndarray, blocks: list[np.ndarray], dtype, device) -> None:
        torch = _torch()
        self.forward, self.adjoint, self.prev = forward, adjoint, prev
        n_features = forward.shape[1]
        self.k = 1 if prev is None else 2
        self.penalty = torch.as_tensor(np.array(penalty.reshape(self.k, n_features).T[:, :, None]), dtype=dtype,
                                       device=device)
        self.blocks = [torch.as_tensor(block, dtype=dtype, device=device) for block in blocks]

    def rhs(self, target):
        if self.prev is None:
            return (self.adjoint @ target)[:, None, :]
        n_cols = target.shape[1]
        stacked = _torch().stack([self.prev * target, target], dim=1).reshape(-1, 2 * n_cols)
        return (self.adjoint @ stacked).reshape(-1, 2, n_cols)

    def apply(self, v):
        n_features, k, n_cols = v.shape
        fv = self.forward @ v.reshape(n_features, k * n_cols)
        if self.prev is None:
            out = (self.adjoint @ fv)[:, None, :]
        else:
            fv = fv.reshape(-1, 2, n_cols)
            u = self.prev * fv[:, 0] + fv[:, 1]
            fv[:, 0], fv[:, 1] = self.prev * u, u
            out = (self.adjoint @ fv.reshape(-1, 2 * n_cols)).reshape(-1, 2, n_cols)
        return out.add_(self.penalty * v)

    def precondition(self, r):
        if self.prev is None:
            return r * self.blocks[0][:, :, None]
        inv_a, inv_b, inv_d = self.blocks
        r_m, r_a = r[:, 0], r[:, 1]
        return _torch().stack([inv_a * r_m + inv_b * r_a, inv_b * r_m + inv_d * r_a], dim=1)


def _pcg_torch(operator: _TorchNormalOperator, rhs, x, tol: float, max_iter: int, rhs_norm):
    """:func:`_pcg` on torch tensors: every column at once, from ``x`` (updated in place)."""
    torch = _torch()
    residual = rhs - operator.apply(x) if bool(x.any()) else rhs.clone()
    z = operator.precondition(residual)
    direction = z.clone()
    rz = _column_dot_torch(residual, z)
    rel = _column_dot_torch(residual, residual).sqrt() / rhs_norm
    n_iter = 0
    zero = torch.zeros((), dtype=torch.float64, device=rhs.device)
    while float(rel.max()) > tol and n_iter < max_iter:
        product = operator.apply(direction)
        curvature = _column_dot_torch(direction, product)
        step = torch.where(curvature > 0, rz / curvature.where(curvature > 0, 1.0), zero).to(x.dtype)
        x.add_(direction * step)
        residual.sub_(product * step)
        z = operator.precondition(residual)
        rz_new = _column_dot_torch(residual, z)
        beta = torch.where(rz > 0, rz_new / rz.where(rz > 0, 1.0), zero).to(x.dtype)
        direction.mul_(beta).add_(z)
        rz = rz_new
        rel = _column_dot_torch(residual, residual).sqrt() / rhs_norm
        n_iter += 1
    return x, n_iter, rel


def _cg_torch(
    features: sp.csr_matrix, prev: np.ndarray, target: np.ndarray, penalty: np.ndarray, multiplicative: bool,
    tol: float, max_iter: int, x0: np.ndarray | None, dtype: type, device: str,
) -> tuple[np.ndarray, SolveInfo]:
    """:func:`_cg` with every array a torch tensor on ``device`` (CUDA when given one): the same blocks, the same
    float32 CG inside float64 refinement, the same preconditioner; the answer comes back as numpy float64."""
    torch = _torch()
    device = torch.device(device)
    n_trans, n_features = features.shape
    n_test = target.shape[1]
    k = 2 if multiplicative else 1
    single = np.dtype(dtype) == np.float32
    refine = single and tol < _SINGLE_INNER_TOL
    fast_dtype = torch.float32 if single else torch.float64
    itemsize = 4 if single else 8
    per_column = itemsize * (n_trans * (3 + 2 * k) + n_features * k * 9) + (16 * n_trans if refine else 0)
    block = max(1, min(n_test, _CG_BLOCK_BYTES // max(per_column, 1)))
    squared = features.multiply(features).T.tocsr()
    n_threads = free_cores() if device.type == "cpu" else torch.get_num_threads()

    def csr(matrix: sp.csr_matrix, kind):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return _torch_csr(sp.csr_matrix(matrix, dtype=np.float64)).to(device=device, dtype=kind)

    pair = {fast_dtype: (csr(features, fast_dtype), csr(features.T.tocsr(), fast_dtype))}
    if refine:
        pair[torch.float64] = (csr(features, torch.float64), csr(features.T.tocsr(), torch.float64))
    theta = np.empty((k, n_features, n_test))
    start = None if x0 is None else np.asarray(x0, dtype=np.float64).reshape(k, n_features, n_test)
    n_iter, worst, n_refine = 0, 0.0, 0
    with _torch_threads(n_threads) if device.type == "cpu" else contextlib.nullcontext():
        for lo in range(0, n_test, block):
            cols = slice(lo, min(n_test, lo + block))
            p = None
            if multiplicative:
                p = prev[:, cols] if prev.shape[1] == n_test else prev[:, np.arange(lo, cols.stop) % prev.shape[1]]
            penalty_blocks = penalty.reshape(k, n_features).T[:, :, None]
            blocks = _jacobi_blocks(squared, p, penalty_blocks)

            ops = {}
            for kind in pair:
                tensor_prev = None if p is None else torch.as_tensor(np.ascontiguousarray(p), device=device).to(kind)
                ops[kind] = _TorchNormalOperator(*pair[kind], tensor_prev, penalty, blocks, kind, device)
            op_fast = ops[fast_dtype]
            op_exact = ops[torch.float64] if refine else op_fast
            exact_dtype = torch.float64 if refine else fast_dtype
            rhs = op_exact.rhs(torch.as_tensor(np.ascontiguousarray(target[:, cols]), device=device).to(exact_dtype))
            rhs_norm = _column_dot_torch(rhs, rhs).sqrt()
            rhs_norm = torch.where(rhs_norm > 0, rhs_norm, torch.ones_like(rhs_norm))
            x = (torch.zeros_like(rhs) if start is None
                 else torch.as_tensor(np.ascontiguousarray(start[:, :, cols].transpose(1, 0, 2)),
                                      device=device).to(exact_dtype))
            if not refine:
                x, used, rel = _pcg_torch(op_fast, rhs, x, tol, max_iter, rhs_norm)
            else:  # iterative refinement, as in _cg
                used, previous = 0, np.inf
                while True:
                    residual = rhs - op_exact.apply(x) if bool(x.any()) else rhs.clone()
                    scale = _column_dot_torch(residual, residual).sqrt()
                    rel = scale / rhs_norm
                    if float(rel.max()) <= tol or used >= max_iter:
                        break
                    if float(rel.max()) > 0.1 * previous:
                        x, more, rel = _pcg_torch(op_exact, rhs, x, tol, max_iter - used, rhs_norm)
                        used += more
                        break
                    previous = float(rel.max())
                    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                    inner_tol = max(_SINGLE_INNER_TOL, tol / previous)
                    correction = torch.zeros(residual.shape, dtype=torch.float32, device=device)
                    correction, inner, _ = _pcg_torch(op_fast, (residual / scale).to(torch.float32), correction,
                                                      inner_tol, max_iter - used, torch.ones_like(scale))
                    x += correction.to(torch.float64) * scale
                    used += inner
                    n_refine += 1
            n_iter = max(n_iter, used)
            worst = max(worst, float(rel.max()))
            theta[:, :, cols] = x.to(torch.float64).cpu().numpy().transpose(1, 0, 2)
    _warn_if_unconverged(n_iter, worst, tol)
    info = SolveInfo("cg", n_iter, worst, kernel=f"torch:{device}", dtype=np.dtype(dtype).name,
                     n_blocks=-(-n_test // block), n_refine=n_refine, threads=n_threads)
    return theta.reshape(k * n_features, n_test), info
