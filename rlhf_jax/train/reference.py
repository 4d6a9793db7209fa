"""Reference log-probs as plain data: run the frozen reference once, store per-pair log-probs.

DPO's loss needs `log pi_ref(y_w|x)` and `log pi_ref(y_l|x)` for every pair; they never change,
so they can be computed once over the preference dataset and stored beside it, and DPO then trains
without holding the reference model (halving its memory and saving a forward per step).

    chosen, rejected = compute_reference_logps(model, ref_params, loader_in_order)
    save_reference_logps(path, chosen, rejected)            # .npz beside the dataset
    ...
    batch = attach_reference_logps(batch, chosen[idx], rejected[idx])   # in the DPO loop

The arrays are aligned with the order in which batches were seen: pass an unshuffled,
non-repeating iteration over the dataset (or give batches an "index" key [B] of example ids, and
the log-probs are placed at those ids).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from rlhf_jax import paths
from rlhf_jax.chunking import chunk_rows
from rlhf_jax.train.dpo import REFERENCE_KEYS, pair_logps

Batch = Mapping[str, Any]

_PAIR_KEYS = tuple(
    f"{side}_{name}"
    for side in ("chosen", "rejected")
    for name in ("tokens", "attention_mask", "loss_mask")
)


def make_reference_fn(
    model: nn.Module, *, average_log_prob: bool = False
) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """`fn(params, batch) -> (chosen_logps [B], rejected_logps [B])`, un-jitted, the same
    computation as the DPO step's reference forward (`dpo.pair_logps`)."""

    def fn(params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        pc, pr, _ = pair_logps(model, params, batch, average=average_log_prob)
        return pc, pr

    return fn


def compute_reference_logps(
    model: nn.Module,
    params: Any,
    batches: Iterable[Batch],
    *,
    average_log_prob: bool = False,
    num_batches: int | None = None,
    batch_fn: Callable[[Batch], Batch] | None = None,
    forward: Callable[[Any, Batch], tuple[jax.Array, jax.Array]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs the reference once over a preference dataset; returns per-pair sequence log-probs.

    `log pi_ref(y|x) = sum_t m[t+1] log softmax(logits_ref[t])[x[t+1]]` (mean when
    `average_log_prob`; must match the DPO step's setting).

    Args:
      model: the reference `Transformer`.
      params: reference params.
      batches: preference batches (only the six pair keys are read; an optional "index" [B] of
        example ids places each row, otherwise rows are numbered in the order seen).
      average_log_prob: length-averaged log-probs instead of sums.
      num_batches: stop after this many batches (for a repeating loader).
      batch_fn: applied to each batch before the forward (e.g. device_put onto a mesh).
      forward: a compiled `fn(params, batch) -> (chosen, rejected)`; default
        `jax.jit(make_reference_fn(model, ...))` (one compilation per distinct batch shape).
    Returns:
      (chosen_logps [N], rejected_logps [N]) float32 NumPy arrays, N = number of rows seen (or
      max index + 1; ids never seen are NaN).
    """
    if forward is None:
        forward = jax.jit(make_reference_fn(model, average_log_prob=average_log_prob))
    chosen, rejected, index = [], [], []
    offset = 0
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        b = len(batch["chosen_tokens"])
        index.append(np.asarray(batch["index"]) if "index" in batch else np.arange(b) + offset)
        offset += b
        pair = {k: batch[k] for k in _PAIR_KEYS}
        if batch_fn is not None:
            pair = batch_fn(pair)
        pc, pr = forward(params, pair)
        chosen.append(pc)
        rejected.append(pr)
    if not chosen:
        return np.zeros((0,), np.float32), np.zeros((0,), np.float32)
    # One host transfer at the end: the loop dispatches asynchronously.
    idx = np.concatenate(index).astype(np.int64)
    pc = np.concatenate([np.asarray(x, np.float32) for x in jax.device_get(chosen)])
    pr = np.concatenate([np.asarray(x, np.float32) for x in jax.device_get(rejected)])
    n = int(idx.max()) + 1
    out_c = np.full((n,), np.nan, np.float32)
    out_r = np.full((n,), np.nan, np.float32)
    out_c[idx], out_r[idx] = pc, pr
    return out_c, out_r


def attach_reference_logps(batch: Batch, chosen: Any, rejected: Any) -> dict[str, Any]:
    """A copy of `batch` with `reference_chosen_logps` / `reference_rejected_logps` [B] float32
    (the DPO step then uses them instead of running a reference model)."""
    c = np.asarray(chosen, np.float32) if isinstance(chosen, (np.ndarray, list)) else chosen
    r = np.asarray(rejected, np.float32) if isinstance(rejected, (np.ndarray, list)) else rejected
    return {**batch, REFERENCE_KEYS[0]: c, REFERENCE_KEYS[1]: r}


def attach_reference_to_records(
    records: Sequence[Mapping[str, Any]], chosen: np.ndarray, rejected: np.ndarray
) -> list[dict[str, Any]]:
    """Stores the log-probs WITH the dataset: record i gets `reference_chosen_logps = chosen[i]`
    and `reference_rejected_logps = rejected[i]` (float), so a loader that batches these fields
    yields DPO batches with precomputed references."""
    if len(records) != len(chosen) or len(records) != len(rejected):
        raise ValueError(
            f"{len(records)} records but {len(chosen)} chosen / {len(rejected)} rejected log-probs"
        )
    return [
        {**rec, REFERENCE_KEYS[0]: float(c), REFERENCE_KEYS[1]: float(r)}
        for rec, c, r in zip(records, chosen, rejected, strict=True)
    ]


def save_reference_logps(path: str | os.PathLike, chosen: np.ndarray, rejected: np.ndarray) -> None:
    """Writes `{path}` (local or cloud, atomically) as an .npz with arrays
    reference_chosen_logps, reference_rejected_logps."""
    paths.save_npz(
        path,
        **{
            REFERENCE_KEYS[0]: np.asarray(chosen, np.float32),
            REFERENCE_KEYS[1]: np.asarray(rejected, np.float32),
        },
    )


def load_reference_logps(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads what `save_reference_logps` wrote: (chosen [N], rejected [N]) float32."""
    z = paths.load_npz(path)
    return z[REFERENCE_KEYS[0]], z[REFERENCE_KEYS[1]]


def attach_reference(
    model: nn.Module,
    params: Any,
    records: Sequence[Mapping[str, Any]],
    collate: Callable[[Sequence[Mapping[str, Any]]], Batch],
    *,
    batch_size: int = 64,
    average_log_prob: bool = False,
    cache_path: str | os.PathLike | None = None,
    is_primary: bool = True,
) -> list[dict[str, Any]]:
    """Runs the reference once over preference records and stores its log-probs WITH them.

    Records go through `collate` (records -> a preference batch, e.g.
    `functools.partial(data.collate_preferences, tokenizer=tok, max_length=..., buckets=None)`)
    in fixed-size chunks (`chunking.chunk_rows`: one compiled shape), then
    `compute_reference_logps`; with `cache_path` (an .npz) the log-probs are read from there when
    present, else computed and written (by the primary host only, `is_primary`).

    Args:
      model, params: the reference `Transformer` and its params.
      records: preference records as mappings (prompt / chosen / rejected, plus any fields).
      collate: records -> preference batch.
      batch_size: pairs per forward.
      average_log_prob: as the DPO step's setting.
      cache_path: optional .npz cache of the log-probs.
      is_primary: whether this process writes the cache.
    Returns:
      The records as dicts carrying `reference_chosen_logps` / `reference_rejected_logps`, so that
      batches of them make the DPO step run no reference model.
    """
    if cache_path is not None and paths.as_path(cache_path).is_file():
        chosen, rejected = load_reference_logps(cache_path)
    else:
        records = list(records)
        batches = (
            {**collate([records[i] for i in idx]), "index": idx}
            for idx, _ in chunk_rows(len(records), batch_size)
        )
        chosen, rejected = compute_reference_logps(
            model, params, batches, average_log_prob=average_log_prob
        )
        if cache_path is not None and is_primary:
            save_reference_logps(cache_path, chosen, rejected)
    return attach_reference_to_records([dict(r) for r in records], chosen, rejected)
