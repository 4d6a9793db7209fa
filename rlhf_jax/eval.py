"""Evaluation: reward vs KL of a policy, win rates across temperatures, and best-of-N.

The reward-vs-KL point of one checkpoint (DPO paper, Rafailov et al. 2023, Fig. 2 left): sample
completions of held-out prompts, score prompt + completion with a reward (the VADER ground truth
on decoded text, or a reward model on tokens), and measure the sequence-level
KL(π(·|x) ‖ π_ref(·|x)) as the sum over generated tokens of the exact per-token KL
(`losses.exact_kl`), beside the k1 and k3 estimates (`losses.kl_estimate`); mean and standard
error over prompts. Generation and the two teacher-forced forwards run as one jitted program per
static configuration (cached; the temperature is traced, so a temperature sweep compiles once);
text rewards run on the host on decoded text.

Sequence layout of every forward (as in `train.ppo`): `[prompt (left-padded, P)][completion (N,
pad after EOS)]` with mask `[prompt_mask][completion_mask]`; the logits that score completion
token i sit at position P - 1 + i. KL and log-probs are those of softmax(logits / temperature),
the distribution sampled from (at temperature 0, greedy, those of temperature 1, as in
`sampling.generate`).

    result = evaluate_reward_kl(Transformer(cfg), params, ref_params, prompt_batch, rng,
                                max_new_tokens=24, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                reward_fn=synthetic.ground_truth_reward, tokenizer=tok)
    result.kl_mean, result.reward_mean, result.reward_stderr, result.texts[:3]
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Real, Shaped

from rlhf_jax import losses
from rlhf_jax.sampling import generate

TextReward = Callable[[list[str]], Any]  # texts [B] -> scores [B] (host; e.g. VADER)
TokenReward = Callable[[np.ndarray, np.ndarray], Any]  # (tokens [B, T], mask [B, T]) -> [B]


# ---------------------------------------------------------------------------------------------
# Pure helpers.


def mean_and_stderr(x: Real[ArrayLike, " B"]) -> tuple[float, float]:
    """Mean over prompts and its standard error `std(x, ddof=1) / sqrt(B)` (NaN when B = 1).

    Args:
      x: [B] per-prompt values (B >= 1).

    Returns:
      (mean, stderr) as Python floats, computed in float64.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    stderr = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(np.mean(x)), stderr


def masked_sequence_sum(
    x: Float[ArrayLike, "B T"], mask: Shaped[ArrayLike, "B T"]
) -> Float[Array, " B"]:
    """`sum_t mask[b, t] * x[b, t]` per row, in float32 (where-select: masked NaN/inf never leak).

    Args:
      x: [B, T] per-token values.
      mask: [B, T] 0/1 (any dtype), 1 on the tokens to sum.

    Returns:
      [B] float32.
    """
    keep = jnp.asarray(mask) != 0  # [B, T]
    return jnp.sum(jnp.where(keep, jnp.asarray(x, jnp.float32), 0.0), axis=-1)


class SequenceKL(NamedTuple):
    """Sequence-level KL(π ‖ π_ref) of sampled completions: exact and the k1/k3 estimates [B], and
    the per-token log-probs of the sampled tokens under both policies [B, N] (0 where masked)."""

    exact: Float[Array, " B"]
    k1: Float[Array, " B"]
    k3: Float[Array, " B"]
    logps: Float[Array, "B N"]
    ref_logps: Float[Array, "B N"]


def sequence_kl(
    logits: Float[ArrayLike, "B N V"],
    ref_logits: Float[ArrayLike, "B N V"],
    tokens: Int[ArrayLike, "B N"],
    mask: Shaped[ArrayLike, "B N"],
) -> SequenceKL:
    """KL(π(·|x) ‖ π_ref(·|x)) of completions y ~ π, summed over their tokens (seed Eq. 3's KL).

    By the chain rule, `KL_seq = E_y[sum_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t))]`, so the sum of
    exact per-token KLs along a sampled y is an unbiased, low-variance estimate of the sequence KL;
    `sum_t k1_t` and `sum_t k3_t` (Schulman 2020) estimate the same number from the sampled
    tokens' log-probs alone.

    Args:
      logits: [B, N, V] policy logits at the positions that predict the completion tokens (already
        divided by the sampling temperature).
      ref_logits: [B, N, V] reference logits at the same positions (same temperature).
      tokens: [B, N] completion tokens.
      mask: [B, N] 1 on completion tokens (up to and including EOS).

    Returns:
      SequenceKL(exact [B], k1 [B], k3 [B], logps [B, N], ref_logps [B, N]).
    """
    keep = jnp.asarray(mask) != 0  # [B, N]
    logps = jnp.where(keep, losses.token_logps(logits, tokens), 0.0)  # [B, N]
    ref_logps = jnp.where(keep, losses.token_logps(ref_logits, tokens), 0.0)  # [B, N]
    return SequenceKL(
        exact=masked_sequence_sum(losses.exact_kl(logits, ref_logits), keep),
        k1=masked_sequence_sum(losses.kl_estimate(logps, ref_logps, estimator="k1"), keep),
        k3=masked_sequence_sum(losses.kl_estimate(logps, ref_logps, estimator="k3"), keep),
        logps=logps,
        ref_logps=ref_logps,
    )


def _response_logits(model, params, prompt_tokens, prompt_mask, tokens, mask):
    """Teacher-forced logits [B, N, V] that score the completion tokens (one forward of
    prompt + completion; the output layer runs on the N completion positions only)."""
    p, n = prompt_tokens.shape[1], tokens.shape[1]
    seq = jnp.concatenate([prompt_tokens, tokens], axis=1)  # [B, P+N]
    seq_mask = jnp.concatenate([prompt_mask, mask], axis=1).astype(jnp.int32)  # [B, P+N]
    variables = {"params": params}
    hidden = model.apply(variables, seq, seq_mask, method="hidden")  # [B, P+N, D]
    return model.apply(variables, hidden[:, p - 1 : p - 1 + n], method="logits")  # [B, N, V]


# ---------------------------------------------------------------------------------------------
# Compiled programs (one per static configuration; jit adds one executable per shape).


def _sampler(model, max_new_tokens, eos_id, pad_id, top_k, top_p):
    """`generate` with the static settings bound: (params, tokens, mask, rng, temperature=)."""
    return functools.partial(
        generate, model, max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p,
        eos_id=eos_id, pad_id=pad_id,
    )  # fmt: skip


@functools.lru_cache(maxsize=32)
def _reward_kl_program(model, *sampling):
    sample = _sampler(model, *sampling)

    def run(policy_params, ref_params, prompt_tokens, prompt_mask, rng, temperature):
        gen = sample(policy_params, prompt_tokens, prompt_mask, rng, temperature=temperature)
        scale = jnp.where(temperature > 0, temperature, 1.0)  # greedy: temperature-1 logits
        args = (prompt_tokens, prompt_mask, gen.tokens, gen.mask)
        logits = _response_logits(model, policy_params, *args) / scale  # [B, N, V]
        ref_logits = _response_logits(model, ref_params, *args) / scale  # [B, N, V]
        kl = sequence_kl(logits, ref_logits, gen.tokens, gen.mask)
        return {
            "tokens": gen.tokens,
            "mask": gen.mask,
            "kl": kl.exact,
            "kl_k1": kl.k1,
            "kl_k3": kl.k3,
            "logps": kl.logps,
            "ref_logps": kl.ref_logps,
        }

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _generate_program(model, *sampling):
    sample = _sampler(model, *sampling)

    def run(params, prompt_tokens, prompt_mask, rng, temperature):
        gen = sample(params, prompt_tokens, prompt_mask, rng, temperature=temperature)
        return {"tokens": gen.tokens, "mask": gen.mask, "logps": gen.logps}

    return jax.jit(run)


def _row_chunks(batch_size: int | None, *arrays: np.ndarray):
    """Yields (real rows, arrays[start:start + size]) over chunks of `batch_size` rows (None: one
    chunk); the last chunk is padded by repeating its first row, so one shape compiles."""
    b = arrays[0].shape[0]
    size = b if batch_size is None else max(1, min(batch_size, b))
    for start in range(0, b, size):
        chunk = [a[start : start + size] for a in arrays]
        real = chunk[0].shape[0]
        if real < size:
            chunk = [np.concatenate([c, np.repeat(c[:1], size - real, axis=0)]) for c in chunk]
        yield real, chunk


def _in_chunks(program, params, prompt_tokens, prompt_mask, rng, temperature, batch_size):
    """Runs `program(*params, tokens, mask, key_i, temperature)` on chunks of `batch_size` rows
    (key_i = fold_in(rng, i), also for a single chunk, so the first rows do not depend on B) and
    returns the concatenated NumPy outputs."""
    temperature = jnp.asarray(temperature, jnp.float32)
    pending = [  # dispatched asynchronously, then gathered
        (real, program(*params, tok, msk, jax.random.fold_in(rng, i), temperature))
        for i, (real, (tok, msk)) in enumerate(_row_chunks(batch_size, prompt_tokens, prompt_mask))
    ]
    chunks = [{k: np.asarray(v)[:real] for k, v in out.items()} for real, out in pending]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _prompts(prompt_batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(prompt_batch["prompt_tokens"], np.int32)
    mask = np.asarray(prompt_batch["prompt_mask"]).astype(np.int32)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(
            f"prompt_tokens/prompt_mask must be [B, P], got {tokens.shape}, {mask.shape}"
        )
    return tokens, mask


def _id_lists(tokens: np.ndarray, mask: np.ndarray, drop_id: int | None) -> list[list[int]]:
    keep = (mask > 0) & (tokens != drop_id) if drop_id is not None else mask > 0
    return [t[k].tolist() for t, k in zip(tokens, keep)]


def _decode(tokenizer, prompt_tokens, prompt_mask, tokens, mask, eos_id):
    """(texts = decoded prompt + completion, completions = decoded completion), EOS dropped."""
    prompt_ids = _id_lists(prompt_tokens, prompt_mask, None)
    completion_ids = _id_lists(tokens, mask, eos_id)
    texts = tokenizer.decode_batch([p + c for p, c in zip(prompt_ids, completion_ids)])
    return list(texts), list(tokenizer.decode_batch(completion_ids))


def _score(reward_fn, token_reward_fn, texts, prompt_tokens, prompt_mask, tokens, mask, what):
    if (reward_fn is None) == (token_reward_fn is None):
        raise ValueError(f"pass exactly one of {what} (texts) and its token-level version")
    if reward_fn is not None:
        if texts is None:
            raise ValueError("a text reward needs `tokenizer` to decode the completions")
        scores = reward_fn(texts)
    else:
        seq = np.concatenate([prompt_tokens, tokens], axis=1)  # [B, P+N]
        seq_mask = np.concatenate([prompt_mask, mask], axis=1).astype(np.int32)  # [B, P+N]
        scores = token_reward_fn(seq, seq_mask)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if scores.shape[0] != tokens.shape[0]:
        raise ValueError(f"the reward returned {scores.shape[0]} scores for {tokens.shape[0]} rows")
    return scores


def reward_model_score_fn(
    reward_model, reward_params, *, batch_size: int | None = None
) -> TokenReward:
    """A jitted token-level reward `(tokens [B, T], mask [B, T]) -> scores [B]` (NumPy) from a
    `models.RewardModel` and its params, for `token_reward_fn=` / `score_fn=` below; rows go
    through in chunks of `batch_size` (the last one padded, so one shape compiles)."""
    apply = _jitted_apply(reward_model)

    def score(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        pending = [
            (real, apply(reward_params, tok, msk))
            for real, (tok, msk) in _row_chunks(batch_size, np.asarray(tokens), np.asarray(mask))
        ]
        return np.concatenate([np.asarray(out)[:real] for real, out in pending])

    return score


@functools.lru_cache(maxsize=16)
def _jitted_apply(model):
    return jax.jit(lambda params, tokens, mask: model.apply({"params": params}, tokens, mask))


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
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    reward_fn: TextReward | None = None,
    token_reward_fn: TokenReward | None = None,
    tokenizer: Any = None,
    batch_size: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
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
      max_new_tokens: N.
      temperature: sampling temperature (> 0; 0 is greedy); traced, no recompile per value.
      eos_id, pad_id: as in `sampling.generate`.
      reward_fn: text reward, `texts (decoded prompt + completion, EOS dropped) -> [B]`, e.g.
        `data.synthetic.ground_truth_reward`; needs `tokenizer`.
      token_reward_fn: or a token reward `(tokens [B, P+N], mask [B, P+N]) -> [B]` on the
        concatenated prompt + completion (e.g. `reward_model_score_fn(...)`).
      tokenizer: anything with `decode_batch(list of id lists) -> list[str]`; texts are decoded
        (and kept) whenever it is given.
      batch_size: rows per compiled call (None: all B at once).
      top_k, top_p: optional sampling truncation (static).

    Returns:
      RewardKL with per-prompt arrays, samples, texts and summaries.
    """
    prompt_tokens, prompt_mask = _prompts(prompt_batch)
    program = _reward_kl_program(model, max_new_tokens, eos_id, pad_id, top_k, top_p)
    out = _in_chunks(
        program,
        (policy_params, ref_params),
        prompt_tokens,
        prompt_mask,
        rng,
        temperature,
        batch_size,
    )
    tokens, mask = out["tokens"].astype(np.int32), out["mask"].astype(np.int32)
    texts = completions = None
    if tokenizer is not None:
        texts, completions = _decode(tokenizer, prompt_tokens, prompt_mask, tokens, mask, eos_id)
    rewards = _score(
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
        temperature=float(temperature),
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
    max_new_tokens: int,
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
      max_new_tokens, eos_id, pad_id, batch_size: as in `evaluate_reward_kl`.

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
            max_new_tokens=max_new_tokens,
            temperature=temperature,
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
    max_new_tokens: int,
    score_fn: TokenReward | None = None,
    text_score_fn: TextReward | None = None,
    reward_fn: TextReward | None = None,
    tokenizer: Any = None,
    temperature: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    batch_size: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> BestOfN:
    """Best-of-N sampling: draw n completions of each prompt from π, keep the best-scored one.

    The reference curve of the DPO paper's frontier: the chosen completions follow π_BoN with
    KL(π_BoN ‖ π) = log n - (n - 1)/n (`best_of_n_kl`, Stiennon et al. 2020), reported as `kl`.

    Args:
      model, params: the base policy π (a `models.Transformer`).
      prompt_batch: {"prompt_tokens": [B, P] LEFT-padded, "prompt_mask": [B, P]}.
      rng: sampling key.
      n: candidates per prompt.
      max_new_tokens: N.
      score_fn: selection score on tokens, `(tokens [R, P+N], mask [R, P+N]) -> [R]` (e.g.
        `reward_model_score_fn(RewardModel(cfg), reward_params)`), R = B * n.
      text_score_fn: or a selection score on decoded texts (needs `tokenizer`).
      reward_fn: optional evaluation reward of the chosen texts (e.g. the ground truth; needs
        `tokenizer`), giving `rewards`, `reward_mean`, `reward_stderr`.
      tokenizer: decodes completions (texts kept when given).
      temperature, eos_id, pad_id, top_k, top_p: sampling, as in `sampling.generate`.
      batch_size: rows (of the B * n candidates) per compiled call; None: all at once.

    Returns:
      BestOfN.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prompt_tokens, prompt_mask = _prompts(prompt_batch)
    b = prompt_tokens.shape[0]
    rep_tokens = np.repeat(prompt_tokens, n, axis=0)  # [B*n, P], candidate j of prompt i at i*n+j
    rep_mask = np.repeat(prompt_mask, n, axis=0)  # [B*n, P]
    program = _generate_program(model, max_new_tokens, eos_id, pad_id, top_k, top_p)
    out = _in_chunks(program, (params,), rep_tokens, rep_mask, rng, temperature, batch_size)
    tokens, mask = out["tokens"].astype(np.int32), out["mask"].astype(np.int32)  # [B*n, N]
    texts = None
    if text_score_fn is not None:
        if tokenizer is None:
            raise ValueError("text_score_fn needs `tokenizer` to decode the completions")
        texts, _ = _decode(tokenizer, rep_tokens, rep_mask, tokens, mask, eos_id)
    all_scores = _score(
        text_score_fn, score_fn, texts, rep_tokens, rep_mask, tokens, mask, "text_score_fn"
    ).reshape(b, n)  # [B, n]
    index = np.argmax(all_scores, axis=1).astype(np.int32)  # [B] first maximum
    rows = np.arange(b) * n + index  # [B]
    chosen_tokens, chosen_mask = tokens[rows], mask[rows]  # [B, N]
    chosen_texts = chosen_completions = None
    if tokenizer is not None:
        chosen_texts, chosen_completions = _decode(
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
