"""Every learner on the tabular bandit (`bandit.core`), as one pure function `train_policy`:
DPO and its variants on Bradley-Terry preference pairs (Eq. 1), policy gradient / PPO on the
KL-penalized reward (Eq. 3) and the critic-free methods (GRPO, Dr. GRPO, RLOO, REINFORCE++) with
the KL in the reward or in the loss; their fixed points are checked against π* (Eq. 4).

Shape letters: X contexts, K arms, N preference pairs, M samples per context, S training steps.
Everything here is pure and un-jitted; a caller compiles, e.g. all seeds and β of one method as one
program::

    train = functools.partial(train_policy, "dpo", steps=1000, lr=0.05)
    over_beta = jax.vmap(train, in_axes=(None, None, 0, None))     # (bandit, weights, beta, rng)
    result = jax.jit(jax.vmap(over_beta, in_axes=(0, 0, None, 0)))(bandits, weights, betas, rngs)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from rlhf_jax.bandit.core import (
    Bandit,
    Scalar,
    inverse_cdf,
    kl_regularized_objective,
    optimal_policy,
    tv_distance,
)
from rlhf_jax.errors import check_positive
from rlhf_jax.losses import (
    PairwiseLoss,
    group_advantages,
    kl_estimate,
    pairwise_loss,
    policy_gradient_loss,
    ppo_policy_loss,
    reinforce_pp_advantages,
)

# method name -> (dpo_loss loss_type, whether label_smoothing applies)
_PREFERENCE_LOSSES = {
    "dpo": ("sigmoid", False),
    "cdpo": ("sigmoid", True),
    "ipo": ("ipo", False),
    "hinge": ("hinge", False),
    "robust": ("robust", True),
}
PREFERENCE_METHODS = tuple(_PREFERENCE_LOSSES)
# Critic-free methods on G = n_samples completions per context, one update per batch:
# method -> group_advantages (baseline, scale), or None for REINFORCE++'s whitened returns.
_CRITIC_FREE = {
    "grpo": ("mean", "std"),
    "dr_grpo": ("mean", "none"),
    "rloo": ("leave_one_out", "none"),
    "reinforce_pp": None,
}
CRITIC_FREE_METHODS = tuple(_CRITIC_FREE)
RL_METHODS = ("pg", "ppo", "exact_pg", *CRITIC_FREE_METHODS)
METHODS = PREFERENCE_METHODS + RL_METHODS
KL_PLACEMENTS = ("reward", "loss")


class TrainResult(NamedTuple):
    """Final policy logits and per-step traces (training loss, Eq. 3, TV to π*)."""

    logits: Float[Array, "X K"]
    loss: Float[Array, " S"]
    objective: Float[Array, " S"]  # mean over contexts of Eq. 3
    tv: Float[Array, " S"]  # mean over contexts of TV(π, π*)


def _preference_loss(
    method: str | PairwiseLoss,
    logits: Float[Array, "X K"],
    ref_logits: Float[Array, "X K"],
    weights: Float[Array, "X K K"],
    beta: Scalar,
    label_smoothing: float,
) -> Float[Array, ""]:
    """Σ W[x,w,l] · loss(x, w, l): the method's pairwise loss on every (x, winner, loser) cell."""
    if callable(method):
        loss = pairwise_loss(method)
    else:
        loss_type, smoothed = _PREFERENCE_LOSSES[method]
        loss = pairwise_loss(loss_type, label_smoothing=label_smoothing if smoothed else 0.0)
    logps = jax.nn.log_softmax(logits, axis=-1)  # [X, K]
    ref_logps = jax.nn.log_softmax(ref_logits, axis=-1)  # [X, K]
    shape = weights.shape

    def chosen(a):  # [X, K] -> [X*K*K], value at the winner (axis 1)
        return jnp.broadcast_to(a[:, :, None], shape).reshape(-1)

    def rejected(a):  # value at the loser (axis 2)
        return jnp.broadcast_to(a[:, None, :], shape).reshape(-1)

    losses, _ = loss(
        chosen(logps), rejected(logps), chosen(ref_logps), rejected(ref_logps), beta=beta
    )  # [X*K*K]
    return jnp.sum(weights.reshape(-1) * losses)


def _sampled_logps(logits: Float[Array, "X K"], y: Int[Array, "X M"]) -> Float[Array, "X M"]:
    """log softmax(logits[x])[y[x, m]]."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y, axis=1)


def _sample(
    logits: Float[Array, "X K"], bandit: Bandit, rng: PRNGKeyArray, n_samples: int
) -> tuple[Int[Array, "X M"], Float[Array, "X M"], Float[Array, "X M"], Float[Array, "X M"]]:
    """M samples y ~ π(·|x) per context: y, log π(y|x), log π_ref(y|x), r(x, y)."""
    n_contexts, n_arms = logits.shape
    u = jax.random.uniform(rng, (n_contexts, n_samples))  # [X, M]
    probs = jnp.broadcast_to(jax.nn.softmax(logits)[:, None], (n_contexts, n_samples, n_arms))
    y = inverse_cdf(probs, u)  # [X, M]
    rewards = jnp.take_along_axis(bandit.rewards, y, axis=1)  # [X, M]
    return y, _sampled_logps(logits, y), _sampled_logps(bandit.ref_logits, y), rewards


def _sample_kl_penalized(
    logits: Float[Array, "X K"], bandit: Bandit, beta: Scalar, rng: PRNGKeyArray, n_samples: int
) -> tuple[Int[Array, "X M"], Float[Array, "X M"], Float[Array, "X M"]]:
    """Sample y ~ π(·|x), M per context; return y, log π(y|x) and leave-one-out advantages.

    The per-sample reward is Eq. 3's integrand with the k1 estimate of the KL,
    R = r(x,y) - β (log π(y|x) - log π_ref(y|x)); E_π[∇log π · R] is the exact gradient of Eq. 3,
    and at π* R = β log Z(x) for every y, so the gradient noise vanishes at the optimum.
    """
    y, logps, ref_logps, rewards = _sample(logits, bandit, rng, n_samples)
    total = rewards - beta * kl_estimate(logps, ref_logps, estimator="k1")  # [X, M]
    # leave-one-out baseline, A_i = R_i - mean_{j≠i} R_j, as a mean of pairwise differences so that
    # A is exactly 0 where all samples agree (Adam would blow rounding noise up to full steps)
    return y, logps, group_advantages(total, baseline="leave_one_out", scale="none")


def _sample_critic_free(
    method: str,
    kl_in: str,
    logits: Float[Array, "X K"],
    bandit: Bandit,
    beta: Scalar,
    rng: PRNGKeyArray,
    n_samples: int,
) -> tuple[Int[Array, "X M"], Float[Array, "X M"], Float[Array, "X M"]]:
    """G = M samples per context (one group per context): y, log π(y|x) and the method's
    advantages, from r - β k1 (KL in the reward) or from r alone (KL in the loss)."""
    y, logps, ref_logps, rewards = _sample(logits, bandit, rng, n_samples)
    kl_coef = beta if kl_in == "reward" else 0.0
    if _CRITIC_FREE[method] is None:  # REINFORCE++: whitened over all X·M samples of the batch
        flat = (rewards.reshape(-1), logps.reshape(-1, 1), ref_logps.reshape(-1, 1))
        adv = reinforce_pp_advantages(*flat, jnp.ones_like(flat[1]), kl_coef=kl_coef)
        return y, logps, adv.reshape(logps.shape)
    baseline, scale = _CRITIC_FREE[method]
    total = rewards - kl_coef * kl_estimate(logps, ref_logps, estimator="k1")  # [X, M]
    return y, logps, group_advantages(total, baseline=baseline, scale=scale)


def train_policy(
    method: str | PairwiseLoss,
    bandit: Bandit,
    pair_weights: Float[Array, "X K K"] | None,
    beta: Scalar,
    rng: PRNGKeyArray,
    *,
    steps: int,
    lr: float = 0.05,
    label_smoothing: float = 0.0,
    n_samples: int = 64,
    ppo_epochs: int = 4,
    clip_eps: float = 0.2,
    init_logits: Float[Array, "X K"] | None = None,
    kl_in: str = "reward",
) -> TrainResult:
    """Train a softmax policy table π(y|x) = softmax(logits[x]) with Adam (cosine-decayed lr).

    Methods: from preference data (`pair_weights`, see `preference_weights` and
    `expected_preference_pairs`), the DPO family of `rlhf_jax.losses.dpo_loss`: "dpo" (sigmoid),
    "cdpo" (sigmoid with `label_smoothing`), "ipo", "hinge", "robust" (with `label_smoothing`), or
    any pairwise loss function `fn(pc, pr, rc, rr, *, beta) -> losses` (the contract of
    `rlhf_jax.losses.pairwise_loss`, e.g. DPO-Positive) on the same comparisons. On the reward
    table, maximizing Eq. 3: "pg" (REINFORCE on the k1-KL-penalized reward with a leave-one-out
    baseline, `n_samples` y ~ π per context and step), "ppo" (the same samples, `ppo_epochs` updates
    of the clipped surrogate `rlhf_jax.losses.ppo_policy_loss`), "exact_pg" (the exact gradient of
    Eq. 3), and the critic-free methods "grpo" (mean / std group advantages), "dr_grpo" (mean,
    unscaled), "rloo" (leave-one-out) and "reinforce_pp" (returns whitened over the batch), on G =
    `n_samples` samples per context, one update of `rlhf_jax.losses.policy_gradient_loss` per batch,
    with the KL in the reward (`kl_in="reward"`: r - β k1, Eq. 3) or in the loss (`kl_in="loss"`: β
    k3, GRPO's form, whose fixed point is `k3_in_loss_fixed_point`, not π*). The policy starts at
    π_ref (or `init_logits`). Scan over steps; pure, un-jitted: jit/vmap over bandits, data, β and
    rng at the call site.

    Args:
      method: one of `METHODS`, or a pairwise loss function (see above).
      bandit: the bandit, [X, K] tables.
      pair_weights: W[x, winner, loser], [X, K, K], for the preference methods (else unused).
      beta: β of the loss and of Eq. 3 (may be traced).
      rng: key for the samples of "pg"/"ppo" (step t uses fold_in(rng, t)).
      steps: number of steps S (each one Adam update; "ppo": `ppo_epochs` updates).
      lr: peak learning rate.
      label_smoothing: ε of "cdpo" and "robust".
      n_samples: samples per context per step M for "pg"/"ppo" (≥ 2).
      ppo_epochs: updates per batch of samples for "ppo".
      clip_eps: PPO clip range.
      init_logits: initial logits, [X, K]; default the reference logits.
      kl_in: "reward" or "loss", for the critic-free methods.
    Returns:
      TrainResult(logits [X, K], loss [S], objective [S], tv [S]), the traces measured before each
      step's update.
    """
    preference = callable(method) or method in PREFERENCE_METHODS
    if not callable(method) and method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; expected one of {METHODS} or a pairwise loss function "
            "fn(pc, pr, rc, rr, *, beta)"
        )
    if preference and pair_weights is None:
        raise ValueError(f"method {method!r} needs pair_weights")
    check_positive("beta", beta)
    sampled = method in ("pg", "ppo", *CRITIC_FREE_METHODS)
    if sampled and n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 for {method!r}'s baseline, got {n_samples}")
    if kl_in not in KL_PLACEMENTS:
        raise ValueError(f"kl_in must be one of {KL_PLACEMENTS}, got {kl_in!r}")
    if kl_in == "loss" and method not in CRITIC_FREE_METHODS:
        raise ValueError(f"kl_in='loss' applies to {CRITIC_FREE_METHODS}, not {method!r}")
    updates_per_step = ppo_epochs if method == "ppo" else 1
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps * updates_per_step))
    logits = bandit.ref_logits if init_logits is None else init_logits
    ref_probs = bandit.ref_probs
    ref_logps = jax.nn.log_softmax(bandit.ref_logits, axis=-1)  # [X, K]
    target = optimal_policy(ref_probs, bandit.rewards, beta)  # [X, K]

    def loss_fn(logits, batch):
        if preference:
            return _preference_loss(
                method, logits, bandit.ref_logits, pair_weights, beta, label_smoothing
            )
        if method == "exact_pg":  # -Eq. 3 from log-probs: finite gradients where π underflows
            logps = jax.nn.log_softmax(logits, axis=-1)  # [X, K]
            penalized = bandit.rewards - beta * (logps - ref_logps)  # [X, K]
            return -jnp.mean(jnp.sum(jnp.exp(logps) * penalized, axis=-1))
        y, old_logps, advantages = batch
        logps = _sampled_logps(logits, y)  # [X, M]
        if method in CRITIC_FREE_METHODS:  # each sample a one-token completion
            column = (logps.reshape(-1, 1), old_logps.reshape(-1, 1))
            kl = {}
            if kl_in == "loss":
                ref = _sampled_logps(bandit.ref_logits, y).reshape(-1, 1)
                kl = dict(ref_logps=ref, kl_coef=beta, kl_estimator="k3")
            loss, _ = policy_gradient_loss(
                *column, advantages.reshape(-1), jnp.ones_like(column[0]), **kl
            )
            return loss
        if method == "pg":
            return -jnp.mean(advantages * logps)
        loss, _ = ppo_policy_loss(
            logps, old_logps, advantages, jnp.ones_like(logps), clip_eps=clip_eps
        )
        return loss

    def update(carry, batch):
        logits, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(logits, batch)
        updates, opt_state = optimizer.update(grads, opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), loss

    def step(carry, t):
        logits = carry[0]
        probs = jax.nn.softmax(logits, axis=-1)
        objective = jnp.mean(kl_regularized_objective(probs, ref_probs, bandit.rewards, beta))
        tv = jnp.mean(tv_distance(probs, target))
        batch = None
        if sampled:
            rng_sample = jax.random.fold_in(rng, t)
            if method in CRITIC_FREE_METHODS:
                batch = _sample_critic_free(
                    method, kl_in, logits, bandit, beta, rng_sample, n_samples
                )
            else:
                batch = _sample_kl_penalized(logits, bandit, beta, rng_sample, n_samples)
            batch = jax.tree.map(jax.lax.stop_gradient, batch)
        if method == "ppo":
            carry, losses = jax.lax.scan(lambda c, _: update(c, batch), carry, None, ppo_epochs)
            loss = losses[0]
        else:
            carry, loss = update(carry, batch)
        return carry, (loss, objective, tv)

    (logits, _), (loss, objective, tv) = jax.lax.scan(
        step, (logits, optimizer.init(logits)), jnp.arange(steps)
    )
    return TrainResult(logits=logits, loss=loss, objective=objective, tv=tv)
