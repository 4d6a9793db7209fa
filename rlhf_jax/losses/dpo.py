"""Direct preference losses: DPO (sigmoid / IPO / hinge / robust), SimPO, ORPO's odds-ratio term
and the token-level unlikelihood baseline."""

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Shaped

from rlhf_jax.errors import check_choice, check_positive, concrete
from rlhf_jax.losses._common import Scalar, bool_mask, f32, masked_mean

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# Log-probabilities are clipped to <= -_LOGP_EPS before log(1 - exp(p)): p = 0 (probability 1)
# would give log 0 = -inf and an infinite gradient.
_LOGP_EPS = 1e-6


def _check_label_smoothing(label_smoothing) -> None:
    v = concrete(label_smoothing)
    if v is not None and not 0.0 <= v < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) (accepted values: 0 <= label_smoothing < 0.5), "
            f"got {label_smoothing!r}"
        )


def _log1mexp(x: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): expm1 near 0, log1p far from 0."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _log_odds(logp: Float[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
    """log(p / (1 - p)) from log p, stably; log p is clipped to <= -1e-6 (p = 1 has no odds)."""
    logp = jnp.minimum(logp, -_LOGP_EPS)
    return logp - _log1mexp(logp)


def dpo_loss(
    policy_chosen_logps: Float[ArrayLike, " B"],
    policy_rejected_logps: Float[ArrayLike, " B"],
    reference_chosen_logps: Float[ArrayLike, " B"],
    reference_rejected_logps: Float[ArrayLike, " B"],
    *,
    beta: Scalar = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: Scalar = 0.0,
) -> tuple[Float[Array, " B"], dict[str, Float[Array, " B"]]]:
    """Per-example DPO loss and its variants; the caller reduces.

    With `h = (pc - rc) - (pr - rr)` and eps = label_smoothing:
    - "sigmoid": `-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)` (Rafailov et al. 2023,
      Eq. 7; eps > 0 is conservative DPO, Mitchell 2023),
    - "ipo": `(h - 1/(2 beta))^2` (Azar et al. 2023, Eq. 17),
    - "hinge": `relu(1 - beta h)` (SLiC, Zhao et al. 2023),
    - "robust": `((1-eps)(-log sigmoid(beta h)) + eps log sigmoid(-beta h)) / (1 - 2 eps)`
      (rDPO, Chowdhury et al. 2024, Eq. 7).
    label_smoothing is used by "sigmoid" and "robust" only.

    Args:
      policy_chosen_logps: [B] log pi(y_w|x) (sequence log-probs).
      policy_rejected_logps: [B] log pi(y_l|x).
      reference_chosen_logps: [B] log pi_ref(y_w|x).
      reference_rejected_logps: [B] log pi_ref(y_l|x).
      beta: KL strength, > 0 (may be a traced 0-d array; then it is not validated).
      loss_type: one of "sigmoid", "ipo", "hinge", "robust".
      label_smoothing: assumed label-flip probability eps in [0, 0.5).

    Returns:
      (losses [B], metrics) with per-example [B] `chosen_rewards = beta (pc - rc)`,
      `rejected_rewards = beta (pr - rr)`, `margins` (their difference) and `accuracies`
      (1.0 where chosen_rewards > rejected_rewards).
    """
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    check_positive("beta", beta)
    _check_label_smoothing(label_smoothing)
    beta, eps = f32(beta), f32(label_smoothing)
    chosen = f32(policy_chosen_logps) - f32(reference_chosen_logps)  # [B] log-ratio of y_w
    rejected = f32(policy_rejected_logps) - f32(reference_rejected_logps)  # [B] log-ratio of y_l
    h = chosen - rejected  # [B]
    z = beta * h  # [B]
    # log_sigmoid(-z), not log(1 - sigmoid(z)): stable for large |z|.
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    elif loss_type == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - z)
    else:  # robust
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (
            1.0 - 2.0 * eps
        )
    chosen_rewards, rejected_rewards = beta * chosen, beta * rejected  # [B], [B]
    metrics = {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
    }
    return losses, metrics


# The pairwise-loss contract: fn(policy_chosen_logps, policy_rejected_logps,
# reference_chosen_logps, reference_rejected_logps, *, beta) -> losses [B], or (losses, metrics).
PairwiseLoss = Callable[..., Any]

# Name -> built-in pairwise loss (label_smoothing is bound by `pairwise_loss`).
PAIRWISE_LOSSES: dict[str, PairwiseLoss] = {
    name: functools.partial(dpo_loss, loss_type=name) for name in DPO_LOSS_TYPES
}


def pairwise_loss(
    loss: str | PairwiseLoss, *, label_smoothing: Scalar = 0.0
) -> Callable[..., tuple[Float[Array, " B"], dict[str, Array]]]:
    """A pairwise loss by name (`PAIRWISE_LOSSES`) or a user's function, as
    `fn(pc, pr, rc, rr, *, beta) -> (losses [B], metrics)`.

    A user's function follows the contract above (e.g. DPO-Positive, Pal et al. 2024) and may
    return the per-example losses alone; it binds its own extra parameters. `label_smoothing`
    applies to the built-in "sigmoid" (cDPO) and "robust" only.

    Raises:
      ValueError: an unknown name (naming the accepted ones), or label_smoothing given with a
        function.
    """
    if callable(loss):
        if concrete(label_smoothing) != 0.0:
            raise ValueError(
                "label_smoothing applies to the built-in losses; bind it in your loss function"
            )
        fn = loss
    else:
        check_choice("loss_type", loss, tuple(PAIRWISE_LOSSES))
        _check_label_smoothing(label_smoothing)
        fn = functools.partial(PAIRWISE_LOSSES[loss], label_smoothing=label_smoothing)

    def call(pc, pr, rc, rr, *, beta):
        out = fn(pc, pr, rc, rr, beta=beta)
        losses, metrics = out if isinstance(out, tuple) else (out, {})
        return f32(losses), dict(metrics)

    return call


def simpo_loss(
    chosen_avg_logps: Float[ArrayLike, " B"],
    rejected_avg_logps: Float[ArrayLike, " B"],
    *,
    beta: Scalar = 2.0,
    gamma: Scalar = 0.5,
) -> Float[Array, " B"]:
    """Per-example SimPO loss (Meng et al. 2024, Eq. 6), reference-free.

    `L = -log sigmoid(beta (c - r) - gamma)` on length-averaged log-probs c, r
    (`sequence_logps(..., average=True)`).

    Args:
      chosen_avg_logps: [B] mean token log-prob of y_w.
      rejected_avg_logps: [B] mean token log-prob of y_l.
      beta: reward scale, > 0.
      gamma: target reward margin.

    Returns:
      [B] float32 losses.
    """
    check_positive("beta", beta)
    logits = f32(beta) * (f32(chosen_avg_logps) - f32(rejected_avg_logps)) - f32(gamma)  # [B]
    return -jax.nn.log_sigmoid(logits)


def cpo_loss(
    chosen_logps: Float[ArrayLike, " B"],
    rejected_logps: Float[ArrayLike, " B"],
    *,
    beta: Scalar = 0.1,
    label_smoothing: Scalar = 0.0,
) -> Float[Array, " B"]:
    """CPO's preference term per example (Xu et al. 2024, Eq. 3), reference-free: DPO's sigmoid
    loss with the reference left out, on the policy's sequence log-probs c, r; the caller adds
    the NLL of the chosen completions (`train.make_dpo_loss(loss_type="cpo")`).

    `L = -(1 - eps) log sigmoid(beta (c - r)) - eps log sigmoid(-beta (c - r))` (eps: label
    smoothing, as `dpo_loss`'s conservative form).

    Returns:
      [B] float32 losses.
    """
    check_positive("beta", beta)
    _check_label_smoothing(label_smoothing)
    logits = f32(beta) * (f32(chosen_logps) - f32(rejected_logps))
    eps = f32(label_smoothing)
    return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


def orpo_odds_ratio_loss(
    chosen_avg_logps: Float[ArrayLike, " B"], rejected_avg_logps: Float[ArrayLike, " B"]
) -> Float[Array, " B"]:
    """ORPO's odds-ratio term per example (Hong et al. 2024, Eq. 7); the caller adds lambda * it
    to the SFT loss.

    `L_OR = -log sigmoid(log odds(c) - log odds(r))`, `log odds(p) = p - log(1 - exp(p))` with
    c, r length-averaged log-probs; `log(1 - exp(p))` via log1mexp, p clipped to <= -1e-6.

    Args:
      chosen_avg_logps: [B] mean token log-prob of y_w (< 0).
      rejected_avg_logps: [B] mean token log-prob of y_l (< 0).

    Returns:
      [B] float32 losses.
    """
    log_or = _log_odds(f32(chosen_avg_logps)) - _log_odds(
        f32(rejected_avg_logps)
    )  # [B] log odds ratio
    return -jax.nn.log_sigmoid(log_or)


def unlikelihood_loss(
    chosen_token_logps: Float[ArrayLike, "B T"],
    chosen_mask: Shaped[ArrayLike, "B T"],
    rejected_token_logps: Float[ArrayLike, "B T"],
    rejected_mask: Shaped[ArrayLike, "B T"],
    *,
    alpha: Scalar = 1.0,
) -> Float[Array, " B"]:
    """Per-example likelihood on y_w plus token-level unlikelihood on y_l (Welleck et al. 2019;
    the "Unlikelihood" baseline of Rafailov et al. 2023, Sec. 6).

    `L = -mean_{t in y_w} log p_t - alpha * mean_{t in y_l} log(1 - p_t)`, masked means
    (÷ max(n, 1)); `log(1 - p)` via log1mexp with log p clipped to <= -1e-6 (p = 1 would be -inf).

    Args:
      chosen_token_logps: [B, T] token log-probs of the preferred responses.
      chosen_mask: [B, T] 0/1 (any dtype).
      rejected_token_logps: [B, T] token log-probs of the dispreferred responses.
      rejected_mask: [B, T] 0/1 (any dtype).
      alpha: weight of the unlikelihood term.

    Returns:
      [B] float32 losses.
    """
    nll = -masked_mean(f32(chosen_token_logps), chosen_mask, axis=-1)  # [B]
    rm = bool_mask(rejected_mask)  # [B, T]
    # Masked-out positions get a harmless constant so padding never reaches log1mexp.
    rej = jnp.where(rm, jnp.minimum(f32(rejected_token_logps), -_LOGP_EPS), -1.0)
    unlikely = -masked_mean(_log1mexp(rej), rm, axis=-1)  # [B]
    return nll + jnp.asarray(alpha, jnp.float32) * unlikely
