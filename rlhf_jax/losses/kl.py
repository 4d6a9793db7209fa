"""KL divergence estimators, exact KL, the KL-penalized per-token reward and the adaptive KL
controller (the KL term of seed Eq. 3)."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from rlhf_jax.errors import check_choice, check_positive
from rlhf_jax.losses._common import Scalar, bool_mask, f32
from rlhf_jax.losses.logprobs import chunk_logits, picked_logps, scan_chunks

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(
    logps: Float[ArrayLike, "B T"],
    ref_logps: Float[ArrayLike, "B T"],
    *,
    estimator: str | Callable[[Array, Array], Array] = "k1",
) -> Float[Array, "B T"]:
    """Per-token Monte Carlo estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With `log r = ref_logps - logps` (Schulman 2020, "Approximating KL divergence"):
    `k1 = -log r` (unbiased), `k2 = (log r)^2 / 2` (biased, low variance),
    `k3 = (r - 1) - log r` (unbiased, non-negative).

    Args:
      logps: [B, T] log pi of the sampled tokens.
      ref_logps: [B, T] log pi_ref of the same tokens.
      estimator: "k1", "k2" or "k3", or a function `(logps, ref_logps) -> [B, T]` (float32
        arrays in, per-token estimates out).

    Returns:
      [B, T] float32 per-token estimates (unmasked; the caller masks).
    """
    if callable(estimator):
        return f32(estimator(f32(logps), f32(ref_logps)))
    check_choice("estimator", estimator, KL_ESTIMATORS)
    log_r = f32(ref_logps) - f32(logps)  # [B, T]
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    return jnp.expm1(log_r) - log_r  # expm1: exact (r - 1) when r is close to 1


def exact_kl(
    logits: Float[ArrayLike, "B T V"], ref_logits: Float[ArrayLike, "B T V"]
) -> Float[Array, "B T"]:
    """Full-vocabulary KL(softmax(logits) || softmax(ref_logits)) at each position.

    `KL[b, t] = sum_v p_v (log p_v - log q_v)` with both log-softmaxes in float32.

    Args:
      logits: [B, T, V] policy logits.
      ref_logits: [B, T, V] reference logits.

    Returns:
      [B, T] float32, >= 0.
    """
    logp = jax.nn.log_softmax(f32(logits), axis=-1)  # [B, T, V]
    logq = jax.nn.log_softmax(f32(ref_logits), axis=-1)  # [B, T, V]
    p = jnp.exp(logp)  # [B, T, V]
    # 0 * (log 0 - log q) := 0; the where keeps -inf logits from making NaN values or gradients.
    return jnp.sum(p * jnp.where(p > 0, logp - logq, 0.0), axis=-1)


def chunked_logps_and_exact_kl(
    hidden: Float[ArrayLike, "B T D"],
    weight: Float[ArrayLike, "_ _"],
    ref_hidden: Float[ArrayLike, "B T D"],
    ref_weight: Float[ArrayLike, "_ _"],
    targets: Int[ArrayLike, "B T"],
    *,
    chunk: int,
    dtype: Any = jnp.float32,
    softcap: float | None = None,
    vocab_major: bool = False,
    temperature: float = 1.0,
    pin: Callable[[str, Array], Array] | None = None,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"], Float[Array, "B T"]]:
    """`(token_logps(logits, targets), token_logps(ref_logits, targets), exact_kl(logits,
    ref_logits))` for `logits = hidden @ weight` and `ref_logits = ref_hidden @ ref_weight`
    (each as `logprobs.chunked_target_logps` computes them), `chunk` positions at a time: the
    policy's and the reference's [B, T, V] logits are never held (the PPO rollout's exact KL).

    Args:
      hidden, ref_hidden: [B, T, D] final hidden states of the policy and of the reference.
      weight, ref_weight: their output layers ([D, V], or [V, D] with `vocab_major`).
      targets: [B, T] token ids.
      chunk, dtype, softcap, vocab_major, temperature, pin: as `chunked_target_logps`.
    Returns:
      ([B, T] policy log-probs, [B, T] reference log-probs, [B, T] KL >= 0), float32.
    """
    logits_of = functools.partial(
        chunk_logits, dtype=dtype, softcap=softcap, vocab_major=vocab_major,
        temperature=temperature, pin=pin or (lambda kind, x: x),
    )  # fmt: skip

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(h_i, r_i, y_i):
        logits, ref_logits = logits_of(h_i, weight), logits_of(r_i, ref_weight)
        kl = exact_kl(logits, ref_logits)
        return picked_logps(logits, y_i), picked_logps(ref_logits, y_i), kl

    xs = (jnp.asarray(hidden), jnp.asarray(ref_hidden), jnp.asarray(targets, jnp.int32))
    return scan_chunks(one, xs, chunk)


def _last_token_onehot(mask: Shaped[ArrayLike, "B T"]) -> Shaped[Array, "B T"]:
    """Bool [B, T], True at the last masked position of each row (nowhere for an empty row)."""
    m = bool_mask(mask)  # [B, T]
    T = m.shape[-1]
    last = T - 1 - jnp.argmax(m[:, ::-1], axis=-1)  # [B] index of the last True
    onehot = jnp.arange(T)[None, :] == last[:, None]  # [B, T]
    return onehot & jnp.any(m, axis=-1, keepdims=True)


def kl_penalized_rewards(
    scores: Float[ArrayLike, " B"],
    logps: Float[ArrayLike, "B T"],
    ref_logps: Float[ArrayLike, "B T"],
    mask: Shaped[ArrayLike, "B T"],
    *,
    kl_coef: Scalar,
    estimator: str | Callable[[Array, Array], Array] = "k1",
) -> Float[Array, "B T"]:
    """Per-token rewards of the KL-regularized objective (seed Eq. 3, as in Ziegler et al. 2019).

    `R[b, t] = -kl_coef * k(t) + [t == last masked token of row b] * scores[b]` on masked
    positions, 0 elsewhere; `k` is `kl_estimate(logps, ref_logps, estimator=...)`. Rows with no
    masked token are all zero (their score is dropped).

    Args:
      scores: [B] sequence-level rewards (reward-model outputs).
      logps: [B, T] log pi of the sampled tokens.
      ref_logps: [B, T] log pi_ref of the same tokens.
      mask: [B, T] 0/1 (any dtype), 1 on response tokens; may end before T.
      kl_coef: KL coefficient beta (float or 0-d array).
      estimator: "k1", "k2", "k3" or a function (see `kl_estimate`).

    Returns:
      [B, T] float32 per-token rewards.
    """
    m = bool_mask(mask)  # [B, T]
    kl = kl_estimate(logps, ref_logps, estimator=estimator)  # [B, T]
    rewards = jnp.where(m, -jnp.asarray(kl_coef, jnp.float32) * kl, 0.0)  # [B, T]
    last = _last_token_onehot(m)  # [B, T]
    return rewards + jnp.where(last, f32(scores)[:, None], 0.0)


def adaptive_kl_coef(
    coef: Scalar, observed_kl: Scalar, n_steps: Scalar, *, target: Scalar, horizon: Scalar
) -> Float[Array, ""]:
    """One update of the adaptive KL controller (Ziegler et al. 2019, Sec. 2.2).

    `e = clip(observed_kl / target - 1, -0.2, 0.2)`, `coef' = coef * (1 + e * n_steps / horizon)`.

    Args:
      coef: current KL coefficient.
      observed_kl: measured KL(pi || pi_ref) (per sequence, same units as target).
      n_steps: number of samples (episodes) since the last update.
      target: target KL (> 0).
      horizon: controller horizon in samples (> 0).

    Returns:
      0-d float32 array, the new coefficient.
    """
    check_positive("target", target)
    check_positive("horizon", horizon)
    err = jnp.clip(f32(observed_kl) / f32(target) - 1.0, -0.2, 0.2)  # proportional error
    return f32(coef) * (1.0 + err * f32(n_steps) / f32(horizon))
