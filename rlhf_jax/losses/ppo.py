"""PPO pieces: generalized advantage estimation, whitening, clipped policy and value losses."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Shaped

from rlhf_jax.losses._common import Scalar, bool_mask, f32, mask_count, masked_mean, masked_sum

# Added to the variance before the inverse square root in `whiten` (as TRL).
WHITEN_EPS = 1e-8


def gae(
    rewards: Float[ArrayLike, "B T"],
    values: Float[ArrayLike, "B T"],
    mask: Shaped[ArrayLike, "B T"],
    *,
    gamma: Scalar = 1.0,
    lam: Scalar = 0.95,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Generalized advantage estimation over the masked span of each row (Schulman et al. 2016).

    `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = delta_t + gamma lam A_{t+1}`, where `V_{t+1}`
    and `A_{t+1}` are 0 after the last masked token (the episode ends there). Computed by a reverse
    `lax.scan` over T. If a mask is not contiguous, each masked run is its own episode.

    Args:
      rewards: [B, T] per-token rewards (e.g. from `kl_penalized_rewards`).
      values: [B, T] value estimates V(s_t).
      mask: [B, T] 0/1 (any dtype), 1 on the response span.
      gamma: discount.
      lam: GAE lambda.

    Returns:
      (advantages [B, T], returns [B, T]) float32; `returns = advantages + values` on the span;
      both are 0 where mask is 0.
    """
    m = bool_mask(mask)  # [B, T]
    r = jnp.where(m, f32(rewards), 0.0)  # [B, T]
    v = jnp.where(m, f32(values), 0.0)  # [B, T], so V = 0 after the span
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)

    def step(carry, xs):
        next_v, next_adv = carry  # [B], [B]: V_{t+1}, A_{t+1} (0 outside the span)
        r_t, v_t, m_t = xs  # [B] each
        delta = r_t + gamma * next_v - v_t  # [B]
        adv = jnp.where(m_t, delta + gamma * lam * next_adv, 0.0)  # [B]
        return (v_t, adv), adv

    zeros = jnp.zeros(r.shape[:1], jnp.float32)  # [B]
    _, adv_tb = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)  # [T, B]
    advantages = adv_tb.T  # [B, T]
    return advantages, jnp.where(m, advantages + v, 0.0)


def whiten(
    x: Float[ArrayLike, "*shape"], mask: Shaped[ArrayLike, "*shape"], *, shift_mean: bool = True
) -> Float[Array, "*shape"]:
    """Masked whitening over all masked entries jointly (the whole batch), as TRL.

    `mu = mean_m(x)`, `var = sum_m (x - mu)^2 / max(n - 1, 1)` (UNBIASED, Bessel-corrected, n =
    number of masked entries), `y = (x - mu) / sqrt(var + 1e-8)`; with `shift_mean=False` the mean
    is added back (`y + mu`). The result is multiplied by the mask: 0 where mask is 0.

    Args:
      x: values of any shape, e.g. [B, T] advantages.
      mask: same shape, 0/1 (any dtype).
      shift_mean: if False, keep the original mean (only rescale).

    Returns:
      float32, same shape as x; 0 where mask is 0.
    """
    m = bool_mask(mask)
    x = f32(x)
    n = mask_count(m)  # scalar
    mean = masked_sum(x, m) / jnp.maximum(n, 1.0)
    var = masked_sum(jnp.square(x - mean), m) / jnp.maximum(n - 1.0, 1.0)  # unbiased
    y = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        y = y + mean
    return jnp.where(m, y, 0.0)


def ppo_policy_loss(
    logps: Float[ArrayLike, "B T"],
    old_logps: Float[ArrayLike, "B T"],
    advantages: Float[ArrayLike, "B T"],
    mask: Shaped[ArrayLike, "B T"],
    *,
    clip_eps: Scalar = 0.2,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """PPO clipped surrogate policy loss, mean over all masked tokens of the batch.

    `rho = exp(logps - old_logps)`, per token `max(-A rho, -A clip(rho, 1-eps, 1+eps))`
    (Schulman et al. 2017, Eq. 7, negated), averaged over masked tokens (÷ max(n, 1)).
    `old_logps` and `advantages` should be constants (the caller stops gradients).

    Args:
      logps: [B, T] log pi_theta of the taken tokens.
      old_logps: [B, T] log pi_old of the same tokens (from the rollout).
      advantages: [B, T] advantages (usually whitened).
      mask: [B, T] 0/1 (any dtype).
      clip_eps: clip range epsilon.

    Returns:
      (loss scalar, metrics) where metrics are scalars: `clipfrac`, the fraction of masked tokens
      where the clipped term is strictly larger (active); `approx_kl`, the masked mean of
      `(logps - old_logps)^2 / 2`.
    """
    m = bool_mask(mask)  # [B, T]
    clip_eps = jnp.asarray(clip_eps, jnp.float32)
    # where-select first so that padding (e.g. -inf log-probs) gives neither NaN values nor grads
    log_ratio = jnp.where(m, f32(logps) - f32(old_logps), 0.0)
    adv = jnp.where(m, f32(advantages), 0.0)  # [B, T]
    ratio = jnp.exp(log_ratio)  # [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # [B, T]; exact inside range
    loss = masked_mean(jnp.maximum(unclipped, clipped), m)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), m),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), m),
    }
    return loss, metrics


def ppo_value_loss(
    values: Float[ArrayLike, "B T"],
    old_values: Float[ArrayLike, "B T"],
    returns: Float[ArrayLike, "B T"],
    mask: Shaped[ArrayLike, "B T"],
    *,
    clip_eps: Scalar = 0.2,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """PPO clipped value loss, mean over all masked tokens of the batch (as TRL / OpenAI baselines).

    `v_clip = old + clip(v - old, -eps, eps)`,
    `L = 1/2 * mean_m max((v - R)^2, (v_clip - R)^2)` (÷ max(n, 1)).

    Args:
      values: [B, T] current value predictions.
      old_values: [B, T] values at rollout time.
      returns: [B, T] targets (from `gae`).
      mask: [B, T] 0/1 (any dtype).
      clip_eps: clip range for the value change.

    Returns:
      (loss scalar, metrics) with scalar `clipfrac`: fraction of masked tokens where the clipped
      squared error is strictly larger (active).
    """
    m = bool_mask(mask)  # [B, T]
    clip_eps = jnp.asarray(clip_eps, jnp.float32)
    v = jnp.where(m, f32(values), 0.0)  # [B, T]
    old = jnp.where(m, f32(old_values), 0.0)  # [B, T]
    ret = jnp.where(m, f32(returns), 0.0)  # [B, T]
    # clip(v, old - eps, old + eps) == old + clip(v - old, -eps, eps), but returns v bit-exactly
    # inside the range, so "clipped is strictly larger" never fires on rounding noise.
    v_clipped = jnp.clip(v, old - clip_eps, old + clip_eps)  # [B, T]
    err = jnp.square(v - ret)  # [B, T]
    err_clipped = jnp.square(v_clipped - ret)  # [B, T]
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), m)
    return loss, {"clipfrac": masked_mean((err_clipped > err).astype(jnp.float32), m)}
