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
    (ties count as wrong), and the mean margin r(chosen) - r(rejected).

    Args:
      reward_model: a `models.RewardModel`; params: its params.
      records: preference records (or mappings with prompt / chosen / rejected).
      tokenizer: the task's tokenizer.
      max_length, max_prompt_length: truncation, as the training batches.
      batch_size: pairs per compiled call (the last chunk padded: one shape).
    Returns:
      {"accuracy": float, "margin": float, "pairs": number of pairs}.
    """
    if not records:
        raise ValueError("preference_accuracy needs at least one pair")
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
    margins = np.concatenate([np.asarray(c - r)[:n] for c, r, n in jax.device_get(pending)])
    return {
        "accuracy": float(np.mean(margins > 0)),
        "margin": float(np.mean(margins)),
        "pairs": float(len(records)),
    }
