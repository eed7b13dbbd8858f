"""Exact k-nearest neighbours by inner product, with the bulk of the arithmetic in bf16 (issue 7).

On CPUs that multiply bf16 natively (AMX on Intel Sapphire Rapids and later, or AVX512-BF16 dot
products on AMD Zen 4 and Intel Cooper Lake: `amx_bf16` / `avx512_bf16` in /proc/cpuinfo) a bf16
matrix product runs 2.5-3.5x faster than float32's. The scores it gives are not exact, but their
error has a bound, so they can choose candidates without losing any true neighbour:

- for unit vectors a, b of dimension D <= 8192, rounding both to bf16 (unit roundoff u = 2^-8),
  multiplying exactly and summing in float32, then rounding the sum to bf16, gives a score within
  ERROR_BOUND = 0.0125 of the exact one (<= 2u + u^2 from the inputs, u from the output,
  D * 2^-24 * (1 + u)^2 from the float32 sums; ~0.0122 in all);
- per query, L = the k-th largest of its block maxima of bf16 scores: at least k items score >= L
  in bf16, so the exact k-th best score is >= L - ERROR_BOUND, and an item whose bf16 score is below
  L - 2 ERROR_BOUND scores exactly below it: it cannot be a neighbour;
- every other item is re-scored in float32 (`stages._knn_select.rerank`), the k best kept.

So the neighbours are those of an exact float32 search (the scores' last bits depend on the
summation order, as between any two BLAS libraries). A query with more candidates than CAPACITY
(scores crowded around its k-th) is searched exactly in float32 instead. Elsewhere (no native
bf16) the k-NN stage keeps faiss' exact float32 search, and below MIN_DIM dimensions too.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from stages._knn_select import candidates, rerank

ERROR_BOUND = 0.0125
MAX_DIM = 8192
#: Below this dimension the product no longer dominates and faiss is as fast ("auto" keeps faiss):
#: 10k x 100k, k 20, on 2 cores: 1.23 s against 1.25 at D = 96, 1.27 against 1.44 at D = 128.
MIN_DIM = 128
#: Candidates kept per query before it falls back to the float32 search.
CAPACITY = 4096
#: bf16 scores held at once (bytes): bounds the query block for large training sets.
SCORE_BUDGET = 256 << 20
THREADS = 2


@lru_cache(maxsize=1)
def has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware, AMX tiles or AVX512-BF16 dot products (Linux
    /proc/cpuinfo flags); without either, torch converts to float32 and the bf16 pass gains nothing."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return " amx_bf16" in flags or " avx512_bf16" in flags
    except OSError:
        return False


def _check_unit_norm(rows: np.ndarray, what: str) -> None:
    """The error bound holds for vectors of norm <= 1 (normalised; zero rows allowed)."""
    norms = np.linalg.norm(rows, axis=1)
    if len(norms) and norms.max() > 1 + 1e-4:
        raise ValueError(f"Bf16CertifiedIndex: {what} must be L2-normalised (largest norm {norms.max():.6g})")


class Bf16CertifiedIndex:
    """Exact inner-product top-k over L2-normalised float32 rows, `search` as faiss' IndexFlatIP."""

    def __init__(self, train: np.ndarray) -> None:
        if train.ndim != 2 or train.dtype != np.float32 or not train.flags.c_contiguous:
            raise ValueError("Bf16CertifiedIndex: expected a C-contiguous (N, D) float32 array")
        if train.shape[1] > MAX_DIM:
            raise ValueError(f"Bf16CertifiedIndex: D = {train.shape[1]} exceeds {MAX_DIM} (error bound)")
        _check_unit_norm(train, "training rows")
        self.train = train
        self.train_bf16_t = torch.from_numpy(train).bfloat16().t()  # (D, N)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) normalised float32 queries → (B, k) scores best first and their (B, k) int64 indices."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _check_unit_norm(queries, "queries")
        n, d = self.train.shape
        if not 1 <= k <= n:
            raise ValueError(f"Bf16CertifiedIndex: k = {k} outside 1..{n}")
        block = int(np.clip(SCORE_BUDGET // (2 * n), 16, 1024))
        scores = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        with ThreadPoolExecutor(THREADS) as pool:
            for start in range(0, len(queries), block):
                rows = slice(start, start + block)
                self._search_block(queries[rows], k, scores[rows], indices[rows], pool)
        return scores, indices

    def _search_block(self, queries: np.ndarray, k: int, scores: np.ndarray, indices: np.ndarray,
                      pool: ThreadPoolExecutor) -> None:
        n, d = self.train.shape
        rows = len(queries)
        approx = (torch.from_numpy(queries).bfloat16() @ self.train_bf16_t).view(torch.int16).numpy()
        found = np.empty((rows, CAPACITY), dtype=np.int32)
        counts = np.empty(rows, dtype=np.int32)

        def select(part: slice) -> None:
            count = part.stop - part.start
            candidates(approx[part], count, n, k, 2 * ERROR_BOUND, found[part], counts[part])
            rerank(queries[part], self.train, found[part], counts[part], count, n, d, k, scores[part], indices[part])

        step = -(-rows // THREADS)
        list(pool.map(select, [slice(s, min(s + step, rows)) for s in range(0, rows, step)]))
        for row in np.flatnonzero(counts < 0):  # crowded: exact float32 over all items
            exact = self.train @ queries[row]
            order = np.lexsort((np.arange(n), -exact))[:k]  # best first, ties to the lower index
            scores[row], indices[row] = exact[order], order
