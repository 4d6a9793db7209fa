"""Fixed-size chunks of rows: the one helper every batched host loop uses (evaluation, pair
sampling, the reference precompute, reward-model accuracy), so a compiled function sees one shape.

    for idx, real in chunk_rows(n, 64):
        out = program(tokens[idx], mask[idx])[:real]
"""

from collections.abc import Iterator

import numpy as np


def chunk_rows(n: int, size: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(indices [size] int64, number of real rows) over the n rows in chunks of `size` rows.

    The last chunk is filled up to `size` by repeating its own first row, so every chunk has one
    shape; `size` None (or larger than n) gives one chunk of n rows. Rows come in order: the real
    rows of the chunks, concatenated, are 0 .. n - 1.
    """
    if n < 1:
        raise ValueError(f"need at least one row, got {n}")
    size = n if size is None else max(1, min(size, n))
    for start in range(0, n, size):
        real = min(size, n - start)
        idx = np.full((size,), start, np.int64)
        idx[:real] = np.arange(start, start + real)
        yield idx, real
