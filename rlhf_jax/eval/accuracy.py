"""Held-out preference accuracy of a reward model: the one function every stage reports."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import data as rdata
from rlhf_jax.chunking import chunk_rows


@functools.lru_cache(maxsize=16)
def _scores_program(reward_model: Any) -> Callable:
    return jax.jit(lambda p, tokens, mask: reward_model.apply({"params": p}, tokens, mask))


def preference_scores(
    reward_model: Any,
    params: Any,
    records: Sequence[Any],
    tokenizer: rdata.Tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Reward-model scores of every pair: (r(chosen) [N], r(rejected) [N]) float32 NumPy.

    Args:
      reward_model: a `models.RewardModel`; params: its params.
      records: preference records (or mappings with prompt / chosen / rejected).
      tokenizer: the task's tokenizer.
      max_length, max_prompt_length: truncation, as the training batches.
      batch_size: pairs per compiled call (`chunking.chunk_rows`: one shape).
    """
    if not records:
        raise ValueError("preference scores need at least one pair")
    batch = rdata.collate_preferences(
        list(records),
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        buckets=None,
    )
    score = _scores_program(reward_model)
    pending = []
    for idx, real in chunk_rows(len(records), batch_size):
        rc = score(params, batch["chosen_tokens"][idx], batch["chosen_attention_mask"][idx])
        rr = score(params, batch["rejected_tokens"][idx], batch["rejected_attention_mask"][idx])
        pending.append((rc, rr, real))
    pending = jax.device_get(pending)  # one transfer: the loop dispatched asynchronously
    chosen = np.concatenate([np.asarray(c, np.float32)[:n] for c, _, n in pending])
    rejected = np.concatenate([np.asarray(r, np.float32)[:n] for _, r, n in pending])
    return chosen, rejected


def preference_accuracy(
    reward_model: Any,
    params: Any,
    records: Sequence[Any],
    tokenizer: rdata.Tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Held-out pair accuracy of a reward model: the fraction of pairs with r(chosen) > r(rejected)
    (ties count as wrong), and the mean margin r(chosen) - r(rejected) (`preference_scores`).

    Returns:
      {"accuracy": float, "margin": float, "pairs": number of pairs} ("pairs" is informational:
      a constant of the run, logged so that a reader sees what the accuracy was measured on).
    """
    chosen, rejected = preference_scores(
        reward_model,
        params,
        records,
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
    )
    margins = chosen.astype(np.float64) - rejected
    return {
        "accuracy": float(np.mean(margins > 0)),
        "margin": float(np.mean(margins)),
        "pairs": float(len(records)),
    }
