"""Losses that need no pairs: KTO on unpaired desirable / undesirable completions (Ethayarajh et
al. 2024) and the generalized Jensen-Shannon divergence of on-policy distillation (GKD, Agarwal et
al. 2024).

KTO. With r = log pi_theta(y|x) - log pi_ref(y|x) (sequence log-probs) and the reference point
z0 = max(0, E[r]) estimated on MISMATCHED prompt-completion pairs of the batch (a completion of
another prompt: a biased but cheap estimate of KL(pi_theta || pi_ref), with no gradient), the
value of a desirable completion is sigma(beta (r - z0)) and of an undesirable one
sigma(beta (z0 - r)); the loss is the weighted shortfall 1 - value:

    L(x, y) = w_d (1 - sigma(beta (r - z0)))   if y is desirable,
              w_u (1 - sigma(beta (z0 - r)))   if y is undesirable.

The paper suggests w_d n_d / (w_u n_u) in [1, 4/3] when the classes are unbalanced.

Generalized JSD, per token over the vocabulary, of the temperature-scaled softmaxes s (student)
and t (teacher) with M = beta t + (1 - beta) s:

    JSD_beta(t || s) = beta KL(t || M) + (1 - beta) KL(s || M),   0 < beta < 1,

and the limits the GKD paper and TRL name: beta = 0 is the forward KL(t || s), beta = 1 the
reverse KL(s || t).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Shaped

from rlhf_jax.errors import check_positive
from rlhf_jax.losses._common import Scalar, bool_mask, f32


def kto_reference_point(
    policy_logps: Float[ArrayLike, " B"], reference_logps: Float[ArrayLike, " B"]
) -> Float[Array, ""]:
    """KTO's z0 = max(0, mean(policy - reference)) over mismatched prompt-completion pairs (the
    caller pairs each completion with another row's prompt), with no gradient."""
    gap = jnp.mean(f32(policy_logps) - f32(reference_logps))
    return jax.lax.stop_gradient(jnp.maximum(gap, 0.0))


def kto_loss(
    policy_logps: Float[ArrayLike, " B"],
    reference_logps: Float[ArrayLike, " B"],
    desirable: Shaped[ArrayLike, " B"],
    kl_reference: Float[ArrayLike, ""],
    *,
    beta: Scalar,
    desirable_weight: Scalar = 1.0,
    undesirable_weight: Scalar = 1.0,
) -> tuple[Float[Array, " B"], dict[str, Array]]:
    """Per-example KTO losses (module doc) and their metrics.

    Args:
      policy_logps, reference_logps: [B] sequence log-probs of each row's completion under the
        policy and the reference.
      desirable: [B] 1 for a desirable completion (label True), 0 for an undesirable one.
      kl_reference: z0, a scalar (`kto_reference_point`); its gradient is stopped here too.
      beta: > 0.
      desirable_weight, undesirable_weight: w_d, w_u (>= 0).

    Returns:
      (losses [B] float32, metrics): `rewards` [B] = beta r, `kl` = z0.
    """
    check_positive("beta", beta)
    beta = f32(beta)
    r = f32(policy_logps) - f32(reference_logps)  # [B]
    z0 = jax.lax.stop_gradient(f32(kl_reference))
    good = bool_mask(desirable)
    value = jnp.where(good, jax.nn.sigmoid(beta * (r - z0)), jax.nn.sigmoid(beta * (z0 - r)))
    weight = jnp.where(good, f32(desirable_weight), f32(undesirable_weight))
    return weight * (1.0 - value), {"rewards": beta * r, "kl": z0}


def generalized_jsd(
    student_logits: Float[ArrayLike, "B T V"],
    teacher_logits: Float[ArrayLike, "B T V"],
    *,
    beta: float,
    temperature: Scalar = 1.0,
) -> Float[Array, "B T"]:
    """Per-token generalized JSD between softmax(student / T) and softmax(teacher / T) (module
    doc): beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher). `beta` is a
    Python number in [0, 1] (it selects the form); the caller masks and reduces."""
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    check_positive("temperature", temperature)
    s = jax.nn.log_softmax(f32(student_logits) / f32(temperature), axis=-1)
    t = jax.nn.log_softmax(f32(teacher_logits) / f32(temperature), axis=-1)

    def kl(p, q):  # KL(p || q) of log-probs over the last axis
        return jnp.sum(jnp.exp(p) * (p - q), axis=-1)

    if beta == 0.0:
        return kl(t, s)
    if beta == 1.0:
        return kl(s, t)
    m = jnp.logaddexp(t + jnp.log(beta), s + jnp.log1p(-beta))  # log(beta t + (1 - beta) s)
    return beta * kl(t, m) + (1.0 - beta) * kl(s, m)
