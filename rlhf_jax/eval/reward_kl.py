"""The reward-vs-KL point of a policy (DPO paper, Rafailov et al. 2023, Fig. 2 left) and win rates
across sampling temperatures (Fig. 2 right).

Sample completions of held-out prompts, score prompt + completion with a reward (the VADER ground
truth on decoded text, or a reward model on tokens), and measure the sequence-level
KL(π(·|x) ‖ π_ref(·|x)) as the sum over generated tokens of the exact per-token KL
(`losses.exact_kl`), beside the k1 and k3 estimates (`losses.kl_estimate`); mean and standard
error over prompts. Generation and the two teacher-forced forwards run as one jitted program per
static configuration (cached; the temperature is traced, so a temperature sweep compiles once);
text rewards run on the host on decoded text.

    result = evaluate_reward_kl(Transformer(cfg), params, ref_params, prompt_batch, rng,
                                sampling=SamplingConfig(max_new_tokens=24),
                                eos_id=tok.eos_id, pad_id=tok.pad_id,
                                reward_fn=synthetic.ground_truth_reward, tokenizer=tok)
    result.kl_mean, result.reward_mean, result.reward_stderr, result.texts[:3]
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Real

from rlhf_jax.eval.common import (
    TextReward,
    TokenReward,
    decode_texts,
    in_chunks,
    mean_and_stderr,
    prompt_arrays,
    reward_kl_program,
    sampling_static,
    score_completions,
)
from rlhf_jax.sampling import SamplingConfig

# ---------------------------------------------------------------------------------------------
# Reward vs KL.


@dataclasses.dataclass(frozen=True)
class RewardKL:
    """Reward and KL(π ‖ π_ref) of sampled completions, per prompt and summarized over prompts.

    Per-prompt arrays (NumPy): `rewards`, `kl` (exact), `kl_k1`, `kl_k3` [B]; the samples
    `prompt_tokens`, `prompt_mask` [B, P], `tokens`, `mask` [B, N] and their per-token log-probs
    `logps`, `ref_logps` [B, N] at the sampling temperature; `texts` (decoded prompt + completion)
    and `completions` when a tokenizer was given. Summaries: mean and standard error over prompts.
    """

    rewards: Float[np.ndarray, " B"]
    kl: Float[np.ndarray, " B"]
    kl_k1: Float[np.ndarray, " B"]
    kl_k3: Float[np.ndarray, " B"]
    prompt_tokens: Int[np.ndarray, "B P"]
    prompt_mask: Int[np.ndarray, "B P"]
    tokens: Int[np.ndarray, "B N"]
    mask: Int[np.ndarray, "B N"]
    logps: Float[np.ndarray, "B N"]
    ref_logps: Float[np.ndarray, "B N"]
    texts: list[str] | None
    completions: list[str] | None
    temperature: float
    reward_mean: float
    reward_stderr: float
    kl_mean: float
    kl_stderr: float
    kl_k1_mean: float
    kl_k1_stderr: float
    kl_k3_mean: float
    kl_k3_stderr: float
    length_mean: float

    def summary(self) -> dict[str, float]:
        """The scalar summaries (e.g. one CSV row)."""
        names = ("reward", "kl", "kl_k1", "kl_k3")
        out = {"temperature": self.temperature, "n": float(self.rewards.shape[0])}
        for name in names:
            out[f"{name}_mean"] = getattr(self, f"{name}_mean")
            out[f"{name}_stderr"] = getattr(self, f"{name}_stderr")
        out["length_mean"] = self.length_mean
        return out


def evaluate_reward_kl(
    model,
    policy_params,
    ref_params,
    prompt_batch: Mapping[str, Any],
    rng: Array,
    *,
    sampling: SamplingConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    reward_fn: TextReward | None = None,
    token_reward_fn: TokenReward | None = None,
    tokenizer: Any = None,
    batch_size: int | None = None,
) -> RewardKL:
    """One (KL, reward) point of a policy: sample, score, measure KL(π ‖ π_ref) per prompt.

    `reward = E_{x, y~π}[r(x, y)]` and `KL = E_x[KL(π(·|x) ‖ π_ref(·|x))]` (the two terms of seed
    Eq. 3; DPO paper Fig. 2 left), the KL as `sum_t exact_kl` along each sampled completion (and
    k1, k3 beside it, see `sequence_kl`); means with standard errors over the B prompts.

    Args:
      model: the `models.Transformer` of both policies.
      policy_params: π's params (samples come from π).
      ref_params: π_ref's params (same model).
      prompt_batch: {"prompt_tokens": [B, P] LEFT-padded, "prompt_mask": [B, P]}.
      rng: sampling key (chunk i of `batch_size` rows uses fold_in(rng, i)).
      sampling: N = max_new_tokens, temperature (> 0; 0 is greedy; traced, no recompile per
        value), top_k / top_p truncation (static).
      eos_id, pad_id: as in `sampling.generate`.
      reward_fn: text reward, `texts (decoded prompt + completion, EOS dropped) -> [B]`, e.g.
        `data.synthetic.ground_truth_reward`; needs `tokenizer`.
      token_reward_fn: or a token reward `(tokens [B, P+N], mask [B, P+N]) -> [B]` on the
        concatenated prompt + completion (e.g. `reward_model_score_fn(...)`).
      tokenizer: anything with `decode_batch(list of id lists) -> list[str]`; texts are decoded
        (and kept) whenever it is given.
      batch_size: rows per compiled call (None: all B at once).

    Returns:
      RewardKL with per-prompt arrays, samples, texts and summaries.
    """
    prompt_tokens, prompt_mask = prompt_arrays(prompt_batch)
    program = reward_kl_program(model, *sampling_static(sampling, eos_id, pad_id))
    out = in_chunks(
        program,
        (policy_params, ref_params),
        prompt_tokens,
        prompt_mask,
        rng,
        sampling.temperature,
        batch_size,
    )
    tokens, mask = out["tokens"].astype(np.int32), out["mask"].astype(np.int32)
    texts = completions = None
    if tokenizer is not None:
        texts, completions = decode_texts(
            tokenizer, prompt_tokens, prompt_mask, tokens, mask, eos_id
        )
    rewards = score_completions(
        reward_fn, token_reward_fn, texts, prompt_tokens, prompt_mask, tokens, mask, "reward_fn"
    )
    stats = {}
    for name, values in (("reward", rewards), *((k, out[k]) for k in ("kl", "kl_k1", "kl_k3"))):
        stats[f"{name}_mean"], stats[f"{name}_stderr"] = mean_and_stderr(values)
    return RewardKL(
        rewards=rewards,
        kl=out["kl"],
        kl_k1=out["kl_k1"],
        kl_k3=out["kl_k3"],
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        tokens=tokens,
        mask=mask,
        logps=out["logps"],
        ref_logps=out["ref_logps"],
        texts=texts,
        completions=completions,
        temperature=float(sampling.temperature),
        length_mean=float(mask.sum(axis=1).mean()),
        **stats,
    )


# ---------------------------------------------------------------------------------------------
# Win rates.


class WinRate(NamedTuple):
    """Fraction of prompts where the policy's completion is judged better (ties count 1/2)."""

    rate: float
    stderr: float
    wins: Float[np.ndarray, " B"]  # per prompt: 1 win, 0.5 tie, 0 loss


def win_rate(
    policy_scores: Real[ArrayLike, " B"], reference_scores: Real[ArrayLike, " B"]
) -> WinRate:
    """Win rate of the policy against reference completions of the same prompts under a judge.

    `wins[b] = 1[s_π > s_ref] + 0.5 * 1[s_π = s_ref]`; rate = mean, stderr = std(ddof=1)/sqrt(B)
    (DPO paper, Fig. 2 right, with a reward as the judge instead of GPT-4).

    Args:
      policy_scores: [B] judge scores of the policy's completions.
      reference_scores: [B] judge scores of the reference completions (same prompts, same order).

    Returns:
      WinRate(rate, stderr, wins [B]).
    """
    p = np.asarray(policy_scores, np.float64).reshape(-1)
    r = np.asarray(reference_scores, np.float64).reshape(-1)
    if p.shape != r.shape:
        raise ValueError(f"need one reference score per policy score, got {p.shape} vs {r.shape}")
    wins = np.where(p > r, 1.0, np.where(p == r, 0.5, 0.0))  # [B]
    rate, stderr = mean_and_stderr(wins)
    return WinRate(rate=rate, stderr=stderr, wins=wins)


def win_rate_sweep(
    model,
    policy_params,
    ref_params,
    prompt_batch: Mapping[str, Any],
    reference_texts: Sequence[str],
    rng: Array,
    *,
    temperatures: Sequence[float],
    judge_fn: TextReward,
    tokenizer: Any,
    sampling: SamplingConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    batch_size: int | None = None,
) -> list[dict[str, float]]:
    """Win rate against reference texts across sampling temperatures (DPO paper Fig. 2 right).

    At each temperature τ, completions y ~ π_τ of the B prompts are decoded to prompt + completion
    texts and judged against `reference_texts` (one per prompt, e.g. the held-out human text) by
    `judge_fn`; the same `rng` at every τ (common random numbers: smoother curves).

    Args:
      model, policy_params, ref_params: as in `evaluate_reward_kl` (π_ref only for the KL column).
      prompt_batch: {"prompt_tokens": [B, P] LEFT-padded, "prompt_mask": [B, P]}.
      reference_texts: B texts to beat (same prompts, same order).
      rng: sampling key.
      temperatures: sampling temperatures (one compile for all of them).
      judge_fn: texts -> [B] scores (e.g. `data.synthetic.ground_truth_reward`).
      tokenizer: decodes the completions.
      sampling: max_new_tokens, top_k, top_p (its temperature is replaced by each of
        `temperatures`).
      eos_id, pad_id, batch_size: as in `evaluate_reward_kl`.

    Returns:
      One dict per temperature: temperature, win_rate, win_rate_stderr, reward_mean,
      reward_stderr, kl_mean, kl_stderr.
    """
    reference_scores = np.asarray(judge_fn(list(reference_texts)), np.float32)
    rows = []
    for temperature in temperatures:
        result = evaluate_reward_kl(
            model,
            policy_params,
            ref_params,
            prompt_batch,
            rng,
            sampling=dataclasses.replace(sampling, temperature=float(temperature)),
            eos_id=eos_id,
            pad_id=pad_id,
            reward_fn=judge_fn,
            tokenizer=tokenizer,
            batch_size=batch_size,
        )
        wr = win_rate(result.rewards, reference_scores)
        rows.append(
            {
                "temperature": float(temperature),
                "win_rate": wr.rate,
                "win_rate_stderr": wr.stderr,
                "reward_mean": result.reward_mean,
                "reward_stderr": result.reward_stderr,
                "kl_mean": result.kl_mean,
                "kl_stderr": result.kl_stderr,
            }
        )
    return rows
