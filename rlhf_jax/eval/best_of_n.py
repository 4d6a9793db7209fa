"""Best-of-N sampling, the KL-efficient reference of the DPO paper's frontier: n completions per
prompt from the base policy, the best-scored one kept; KL(π_BoN ‖ π) = log n - (n - 1)/n."""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Real

from rlhf_jax.eval.common import (
    TextReward,
    TokenReward,
    decode_texts,
    mean_and_stderr,
    prompt_arrays,
    sample_completions,
    score_completions,
)
from rlhf_jax.sampling import SamplingConfig

# ---------------------------------------------------------------------------------------------
# Best-of-N.


def best_of_n_kl(n: int) -> float:
    """KL(π_BoN ‖ π) = log N - (N - 1)/N of best-of-N sampling against the base policy.

    Stiennon et al. 2020 (App. G.3): with a continuous reward (every outcome of vanishing
    probability, no ties), the best of N draws has quantile density N u^(N-1), whose KL to the
    uniform is log N - (N - 1)/N. For discrete outcomes it is an upper bound (Beirami et al.
    2024); `best_of_n_probs` gives the exact best-of-N distribution of a categorical.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_probs(
    probs: Float[ArrayLike, " K"], rewards: Real[ArrayLike, " K"], n: int
) -> Float[np.ndarray, " K"]:
    """Exact distribution of the best of n i.i.d. draws from a categorical, ranked by reward.

    With F(y) = P(r(Y) <= r(y)) and F(y-) = P(r(Y) < r(y)), the maximal reward lands in the tie
    group G(y) of y with probability F(y)^n - F(y-)^n, and within the group the pick is ∝ π:
    `p_BoN(y) = π(y) / π(G(y)) * (F(y)^n - F(y-)^n)` (ties broken by the first maximal draw).

    Args:
      probs: [K] base probabilities π(y) (summing to 1).
      rewards: [K] reward of each outcome.
      n: number of draws N >= 1.

    Returns:
      [K] float64 best-of-N probabilities.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = np.asarray(probs, np.float64)
    _, group_of = np.unique(np.asarray(rewards, np.float64), return_inverse=True)  # [K]
    group_mass = np.bincount(group_of, weights=p)  # [G] π(G), groups by increasing reward
    at_most = np.cumsum(group_mass)[group_of]  # [K] F(y)
    below = at_most - group_mass[group_of]  # [K] F(y-)
    group = group_mass[group_of]  # [K] π(G(y))
    safe = np.where(group > 0, group, 1.0)
    return np.where(group > 0, p / safe * (at_most**n - below**n), 0.0)


@dataclasses.dataclass(frozen=True)
class BestOfN:
    """Best of n completions per prompt, chosen by a score; KL to the base policy (analytic).

    `tokens`, `mask` [B, N] the chosen completions; `scores` [B] their selection scores,
    `all_scores` [B, n] those of every candidate, `index` [B] which candidate won; `kl` =
    `best_of_n_kl(n)`; `texts`/`completions` when a tokenizer was given; `rewards` and their
    mean/stderr when an evaluation `reward_fn` was given.
    """

    prompt_tokens: Int[np.ndarray, "B P"]
    prompt_mask: Int[np.ndarray, "B P"]
    tokens: Int[np.ndarray, "B N"]
    mask: Int[np.ndarray, "B N"]
    scores: Float[np.ndarray, " B"]
    all_scores: Float[np.ndarray, "B n"]
    index: Int[np.ndarray, " B"]
    n: int
    kl: float
    texts: list[str] | None
    completions: list[str] | None
    rewards: Float[np.ndarray, " B"] | None
    reward_mean: float | None
    reward_stderr: float | None


def best_of_n(
    model,
    params,
    prompt_batch: Mapping[str, Any],
    rng: Array,
    *,
    n: int,
    sampling: SamplingConfig,
    score_fn: TokenReward | None = None,
    text_score_fn: TextReward | None = None,
    reward_fn: TextReward | None = None,
    tokenizer: Any = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    batch_size: int | None = None,
) -> BestOfN:
    """Best-of-N sampling: draw n completions of each prompt from π, keep the best-scored one.

    The reference curve of the DPO paper's frontier: the chosen completions follow π_BoN with
    KL(π_BoN ‖ π) = log n - (n - 1)/n (`best_of_n_kl`, Stiennon et al. 2020), reported as `kl`.

    Args:
      model, params: the base policy π (a `models.Transformer`).
      prompt_batch: {"prompt_tokens": [B, P] LEFT-padded, "prompt_mask": [B, P]}.
      rng: sampling key.
      n: candidates per prompt.
      sampling: how candidates are drawn (max_new_tokens N, temperature, top_k, top_p).
      score_fn: selection score on tokens, `(tokens [R, P+N], mask [R, P+N]) -> [R]` (e.g.
        `reward_model_score_fn(RewardModel(cfg), reward_params)`), R = B * n.
      text_score_fn: or a selection score on decoded texts (needs `tokenizer`).
      reward_fn: optional evaluation reward of the chosen texts (e.g. the ground truth; needs
        `tokenizer`), giving `rewards`, `reward_mean`, `reward_stderr`.
      tokenizer: decodes completions (texts kept when given).
      eos_id, pad_id: as in `sampling.generate`.
      batch_size: rows (of the B * n candidates) per compiled call; None: all at once.

    Returns:
      BestOfN.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prompt_tokens, prompt_mask = prompt_arrays(prompt_batch)
    b = prompt_tokens.shape[0]
    rep_tokens = np.repeat(prompt_tokens, n, axis=0)  # [B*n, P], candidate j of prompt i at i*n+j
    rep_mask = np.repeat(prompt_mask, n, axis=0)  # [B*n, P]
    out = sample_completions(
        model,
        params,
        {"prompt_tokens": rep_tokens, "prompt_mask": rep_mask},
        rng,
        sampling=sampling,
        eos_id=eos_id,
        pad_id=pad_id,
        batch_size=batch_size,
    )
    tokens, mask = out["tokens"], out["mask"]  # [B*n, N]
    texts = None
    if text_score_fn is not None:
        if tokenizer is None:
            raise ValueError("text_score_fn needs `tokenizer` to decode the completions")
        texts, _ = decode_texts(tokenizer, rep_tokens, rep_mask, tokens, mask, eos_id)
    all_scores = score_completions(
        text_score_fn, score_fn, texts, rep_tokens, rep_mask, tokens, mask, "text_score_fn"
    ).reshape(b, n)  # [B, n]
    index = np.argmax(all_scores, axis=1).astype(np.int32)  # [B] first maximum
    rows = np.arange(b) * n + index  # [B]
    chosen_tokens, chosen_mask = tokens[rows], mask[rows]  # [B, N]
    chosen_texts = chosen_completions = None
    if tokenizer is not None:
        chosen_texts, chosen_completions = decode_texts(
            tokenizer, prompt_tokens, prompt_mask, chosen_tokens, chosen_mask, eos_id
        )
    rewards = reward_mean = reward_stderr = None
    if reward_fn is not None:
        if chosen_texts is None:
            raise ValueError("reward_fn needs `tokenizer` to decode the completions")
        rewards = np.asarray(reward_fn(chosen_texts), np.float32).reshape(-1)
        reward_mean, reward_stderr = mean_and_stderr(rewards)
    return BestOfN(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        tokens=chosen_tokens,
        mask=chosen_mask,
        scores=all_scores[np.arange(b), index],
        all_scores=all_scores,
        index=index,
        n=n,
        kl=best_of_n_kl(n),
        texts=chosen_texts,
        completions=chosen_completions,
        rewards=rewards,
        reward_mean=reward_mean,
        reward_stderr=reward_stderr,
    )
