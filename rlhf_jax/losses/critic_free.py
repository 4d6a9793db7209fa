"""Critic-free policy gradients: group advantages and the clipped policy-gradient loss of GRPO,
Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE++, as pure functions of arrays.

The methods differ in a few choices, each a keyword here:

- GRPO (Shao et al. 2024, DeepSeekMath): `group_advantages(baseline="mean", scale="std")`, token
  ratio clipped at ε, `aggregation="sequence_mean"`, k3 KL in the loss.
- Dr. GRPO (Liu et al. 2025): `baseline="mean", scale="none"`, `aggregation="sequence_sum_norm"`.
- DAPO (Yu et al. 2025): `scale="std"`, clip-higher (`clip_eps_high > clip_eps_low`),
  `aggregation="token_mean"`, no KL, plus dynamic sampling (`select_groups`) and the overlong
  penalty (`overlong_penalty`) outside the loss.
- GSPO (Zheng et al. 2025): `ratio="sequence"` (the length-normalised sequence ratio),
  `aggregation="sequence_mean"`.
- RLOO (Ahmadian et al. 2024): `baseline="leave_one_out", scale="none"`, KL in the reward.
- REINFORCE++ (Hu 2025): `reinforce_pp_advantages` (KL-penalised reward-to-go, whitened over the
  batch), `aggregation="token_mean"`.

Where the KL term goes is a separate choice for every method: in the reward (Eq. 3, e.g.
`losses.kl_penalized_rewards` or `scores - kl_coef * KL`) or in the loss (`policy_gradient_loss(...,
ref_logps=, kl_coef=, kl_estimator="k3")`, the GRPO paper's form).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Shaped

from rlhf_jax.errors import check_choice
from rlhf_jax.losses._common import Scalar, bool_mask, f32, mask_count, masked_mean, masked_sum
from rlhf_jax.losses.kl import kl_estimate, kl_penalized_rewards
from rlhf_jax.losses.logprobs import entropy_from_logits
from rlhf_jax.losses.ppo import whiten

BASELINES = ("mean", "leave_one_out")
SCALES = ("std", "none")
RATIOS = ("token", "sequence")
AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum_norm")


def group_advantages(
    rewards: Float[ArrayLike, "P G"],
    *,
    baseline: str | Callable[[Array], Array] = "mean",
    scale: str = "std",
    eps: float = 1e-6,
) -> Float[Array, "P G"]:
    """Advantages of G completions per prompt from their rewards, relative to the group.

    `baseline="mean"`: `A_i = r_i - mean_j r_j` (GRPO, Dr. GRPO, DAPO, GSPO);
    `baseline="leave_one_out"`: `A_i = r_i - mean_{j≠i} r_j = G/(G-1) (r_i - mean_j r_j)` (RLOO,
    computed as a mean of pairwise differences, so exactly 0 where the group agrees); or a
    function `rewards [P, G] -> baselines [P, G]`.
    `scale="std"` then divides by `std_j r_j + eps` with the unbiased (G - 1) standard deviation, as
    TRL's GRPOTrainer (`torch.std`); `scale="none"` keeps the reward's units (Dr. GRPO, RLOO).

    Args:
      rewards: [P, G] rewards of G completions of each of P prompts (G >= 2).
      baseline: "mean", "leave_one_out" or a function (see above).
      scale: "std" or "none".
      eps: added to the standard deviation.

    Returns:
      [P, G] float32 advantages.
    """
    r = f32(rewards)
    g = r.shape[-1]
    if g < 2:
        raise ValueError(f"group_advantages needs G >= 2 completions per prompt, got G={g}")
    if callable(baseline):
        adv = r - f32(baseline(r))
    else:
        check_choice("baseline", baseline, BASELINES)
        if baseline == "mean":
            adv = r - jnp.mean(r, axis=-1, keepdims=True)
        else:
            adv = jnp.sum(r[..., :, None] - r[..., None, :], axis=-1) / (g - 1)
    check_choice("scale", scale, SCALES)
    if scale == "std":
        adv = adv / (jnp.std(r, axis=-1, keepdims=True, ddof=1) + eps)
    return adv


def overlong_penalty(
    lengths: Shaped[ArrayLike, " B"], *, max_length: int, cache_length: int
) -> Float[Array, " B"]:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), added to the task reward.

    With `L_max = max_length` and `L_cache = cache_length`: 0 for `L <= L_max - L_cache`,
    `(L_max - L_cache - L) / L_cache` inside the last `L_cache` tokens (down to -1 at `L_max`),
    -1 beyond. A completion truncated at `max_new_tokens = L_max` therefore gets -1.

    Args:
      lengths: [B] completion lengths in tokens (EOS included).
      max_length: L_max (>= 1).
      cache_length: L_cache, the length of the ramp (1 <= L_cache <= L_max).

    Returns:
      [B] float32 penalties in [-1, 0].
    """
    if not 1 <= cache_length <= max_length:
        raise ValueError(
            f"overlong_penalty needs 1 <= cache_length <= max_length, got cache_length="
            f"{cache_length}, max_length={max_length}"
        )
    n = f32(lengths)
    ramp = (max_length - cache_length - n) / cache_length
    return jnp.clip(jnp.minimum(ramp, 0.0), -1.0, 0.0)


def select_groups(
    rewards: Float[ArrayLike, "P G"], num_groups: int
) -> tuple[Shaped[Array, " K"], Shaped[Array, " K"]]:
    """DAPO's dynamic sampling with static shapes: the first `num_groups` groups whose rewards are
    not all equal (a group that agrees has zero advantage under a mean baseline: no signal).

    DAPO samples until the batch holds `num_groups` informative groups; a compiled step samples a
    fixed `P >= num_groups` groups instead and keeps the informative ones in their order. When
    fewer than `num_groups` are informative the rest of the slots are filled with uninformative
    groups, flagged `False` in `valid` (train on them with weight 0).

    Args:
      rewards: [P, G] rewards of G completions of P prompts.
      num_groups: K <= P groups to keep.

    Returns:
      (indices [K] int32 into P, valid [K] bool: the kept group is informative).
    """
    r = f32(rewards)
    p = r.shape[0]
    if not 1 <= num_groups <= p:
        raise ValueError(f"select_groups keeps 1 <= num_groups <= P={p} groups, got {num_groups}")
    informative = jnp.max(r, axis=-1) > jnp.min(r, axis=-1)  # [P]
    order = jnp.argsort(jnp.logical_not(informative), stable=True)  # informative first, in order
    idx = order[:num_groups].astype(jnp.int32)
    return idx, informative[idx]


def reward_to_go(
    rewards: Float[ArrayLike, "B T"], mask: Shaped[ArrayLike, "B T"], *, gamma: Scalar = 1.0
) -> Float[Array, "B T"]:
    """`G_t = sum_{k >= t, masked} gamma^(k - t) R_k`: the discounted return from each masked
    token to the end of its row (0 where mask is 0).

    Args:
      rewards: [B, T] per-token rewards.
      mask: [B, T] 0/1, 1 on response tokens.
      gamma: discount (1: the plain sum of the rest of the row).
    """
    m = bool_mask(mask)
    r = jnp.where(m, f32(rewards), 0.0)
    gamma = jnp.asarray(gamma, jnp.float32)

    def back(carry, x):
        r_t, m_t = x
        carry = jnp.where(m_t, r_t + gamma * carry, carry)
        return carry, carry

    _, out = jax.lax.scan(back, jnp.zeros(r.shape[0]), (r.T, m.T), reverse=True)
    return jnp.where(m, out.T, 0.0)


def reinforce_pp_advantages(
    scores: Float[ArrayLike, " B"],
    logps: Float[ArrayLike, "B T"],
    ref_logps: Float[ArrayLike, "B T"],
    mask: Shaped[ArrayLike, "B T"],
    *,
    kl_coef: Scalar,
    estimator: str | Callable[[Array, Array], Array] = "k1",
    gamma: Scalar = 1.0,
) -> Float[Array, "B T"]:
    """REINFORCE++ advantages (Hu 2025): the KL-penalised per-token reward of Eq. 3
    (`kl_penalized_rewards`: `-kl_coef * k_t`, plus the score on the last token), its reward-to-go,
    whitened over every masked token of the (global) batch.

    Args:
      scores: [B] sequence rewards.
      logps, ref_logps: [B, T] log-probs of the sampled tokens under the policy and reference.
      mask: [B, T] response mask.
      kl_coef: KL coefficient (0: no KL in the reward).
      estimator: the per-token KL estimate ("k1", "k2", "k3" or a function).
      gamma: discount of the reward-to-go.

    Returns:
      [B, T] float32 advantages, 0 where mask is 0.
    """
    rewards = kl_penalized_rewards(
        scores, logps, ref_logps, mask, kl_coef=kl_coef, estimator=estimator
    )
    return whiten(reward_to_go(rewards, mask, gamma=gamma), mask)


def policy_gradient_loss(
    logps: Float[ArrayLike, "B T"],
    old_logps: Float[ArrayLike, "B T"],
    advantages: Float[ArrayLike, " B"] | Float[ArrayLike, "B T"],
    mask: Shaped[ArrayLike, "B T"],
    *,
    clip_eps_low: Scalar = 0.2,
    clip_eps_high: Scalar | None = None,
    ratio: str = "token",
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
    ref_logps: Float[ArrayLike, "B T"] | None = None,
    kl_coef: Scalar = 0.0,
    kl_estimator: str | Callable[[Array, Array], Array] = "k3",
    logits: Float[ArrayLike, "B T V"] | None = None,
    entropy: Float[ArrayLike, "B T"] | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The clipped policy-gradient loss of the critic-free family (arrays in, arrays out).

    Per token: `l_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high))`, with
    - `ratio="token"`: `rho_t = exp(logps_t - old_logps_t)` (PPO, GRPO; DAPO's clip-higher is
      `clip_eps_high > clip_eps_low`);
    - `ratio="sequence"`: one ratio per row, `rho = exp(mean_t(logps_t - old_logps_t))` over its
      masked tokens (GSPO's length-normalised sequence ratio), used on every token of the row;
    plus `kl_coef * k_t` with `k = kl_estimate(logps, ref_logps, estimator=kl_estimator)` when
    `ref_logps` is given (GRPO's KL in the loss; k3 by default). Then aggregated:
    - `"token_mean"`: sum over every masked token of the batch / their number (DAPO);
    - `"sequence_mean"`: mean over rows of each row's token mean (GRPO, GSPO);
    - `"sequence_sum_norm"`: sum over every masked token / (B * max_tokens), a constant
      (Dr. GRPO; `max_tokens` defaults to T).
    In both sequence aggregations B counts the rows with at least one masked token, so rows
    masked out entirely (groups dropped by dynamic sampling) weigh nothing.
    `old_logps`, `advantages` and `ref_logps` should be constants (the caller stops gradients).

    Args:
      logps: [B, T] log pi_theta of the sampled tokens.
      old_logps: [B, T] log pi_old of the same tokens (the rollout's).
      advantages: [B] (one per sequence, broadcast over its tokens) or [B, T].
      mask: [B, T] 0/1 response mask.
      clip_eps_low, clip_eps_high: the clip range [1 - low, 1 + high]; high defaults to low.
      ratio: "token" or "sequence".
      aggregation: "token_mean", "sequence_mean" or "sequence_sum_norm".
      max_tokens: the constant of "sequence_sum_norm" (default T).
      ref_logps: [B, T] log pi_ref, for the KL term in the loss (None: no KL term).
      kl_coef: its coefficient.
      kl_estimator: "k1", "k2", "k3" or a function (see `kl_estimate`).
      logits: [B, T, V] policy logits, for the entropy metric (optional).
      entropy: [B, T] the policy's entropies instead of `logits` (chunked log-probs).

    Returns:
      (loss, metrics): `pg_loss` (the clipped term alone), `kl` (the masked token mean of the
      estimate; 0 without `ref_logps`), `clipfrac_low` / `clipfrac_high` (the fraction of masked
      tokens where the lower / upper clip is active: A < 0 and rho < 1 - low, A > 0 and
      rho > 1 + high), `clipfrac` (their sum), `approx_kl` (masked mean of
      (logps - old_logps)^2 / 2), `ratio_mean`, and `entropy` when `logits` or `entropy` are
      given.
    """
    check_choice("ratio", ratio, RATIOS)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    m = bool_mask(mask)  # [B, T]
    b, t = m.shape
    low = jnp.asarray(clip_eps_low, jnp.float32)
    high = low if clip_eps_high is None else jnp.asarray(clip_eps_high, jnp.float32)
    # where-select first so that padding (e.g. -inf log-probs) gives neither NaN values nor grads
    log_ratio = jnp.where(m, f32(logps) - f32(old_logps), 0.0)  # [B, T]
    adv = f32(advantages)
    adv = jnp.broadcast_to(adv[:, None], (b, t)) if adv.ndim == 1 else adv
    adv = jnp.where(m, adv, 0.0)
    if ratio == "sequence":
        seq_log_ratio = masked_sum(log_ratio, m, axis=-1) / jnp.maximum(mask_count(m, -1), 1.0)
        rho = jnp.broadcast_to(jnp.exp(seq_log_ratio)[:, None], (b, t))
    else:
        rho = jnp.exp(log_ratio)
    unclipped = -adv * rho
    clipped = -adv * jnp.clip(rho, 1.0 - low, 1.0 + high)
    per_token = jnp.maximum(unclipped, clipped)  # [B, T]
    kl = jnp.zeros_like(per_token)
    if ref_logps is not None:
        lp, rlp = jnp.where(m, f32(logps), 0.0), jnp.where(m, f32(ref_logps), 0.0)
        kl = jnp.where(m, kl_estimate(lp, rlp, estimator=kl_estimator), 0.0)
    total = per_token + jnp.asarray(kl_coef, jnp.float32) * kl

    rows = jnp.maximum(jnp.sum(jnp.any(m, axis=-1)), 1).astype(jnp.float32)  # non-empty rows

    def aggregate(x):
        if aggregation == "token_mean":
            return masked_mean(x, m)
        if aggregation == "sequence_mean":
            return jnp.sum(masked_mean(x, m, axis=-1)) / rows
        return masked_sum(x, m) / (rows * (t if max_tokens is None else max_tokens))

    active_low = (adv < 0) & (rho < 1.0 - low)
    active_high = (adv > 0) & (rho > 1.0 + high)
    metrics = {
        "pg_loss": aggregate(per_token),
        "kl": masked_mean(kl, m),
        "clipfrac_low": masked_mean(active_low.astype(jnp.float32), m),
        "clipfrac_high": masked_mean(active_high.astype(jnp.float32), m),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), m),
        "ratio_mean": masked_mean(rho, m),
    }
    metrics["clipfrac"] = metrics["clipfrac_low"] + metrics["clipfrac_high"]
    if logits is not None:
        entropy = entropy_from_logits(logits)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy, m)
    return aggregate(total), metrics
