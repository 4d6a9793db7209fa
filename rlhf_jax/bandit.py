"""Tabular contextual bandit: the closed-form testbed for the KL-regularized objective.

Contexts x are uniform over X values, arms y over K values; the reference policy is
π_ref(y|x) = softmax(ref_logits[x]) and the reward table is r(x, y). On this bandit the optimum of
Eq. 3 is known in closed form (Eq. 4), so the fixed point of every learner (DPO and its variants on
Bradley-Terry preference pairs, Eq. 1; policy gradient / PPO on the KL-penalized reward) can be
checked against π* exactly.

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
from jax.scipy.special import xlogy
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, Real

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

Scalar = Real[ArrayLike, ""]

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


class Bandit(NamedTuple):
    """A tabular contextual bandit (a pytree: vmap over a leading axis for many bandits)."""

    ref_logits: Float[Array, "X K"]  # π_ref(y|x) = softmax(ref_logits[x])
    rewards: Float[Array, "X K"]  # r(x, y)

    @property
    def ref_probs(self) -> Float[Array, "*batch X K"]:
        return jax.nn.softmax(self.ref_logits, axis=-1)


class Preferences(NamedTuple):
    """Sampled comparisons (x, y_w, y_l): arm `chosen` was preferred to `rejected` in context x."""

    x: Int[Array, " N"]
    chosen: Int[Array, " N"]
    rejected: Int[Array, " N"]


class TrainResult(NamedTuple):
    """Final policy logits and per-step traces (training loss, Eq. 3, TV to π*)."""

    logits: Float[Array, "X K"]
    loss: Float[Array, " S"]
    objective: Float[Array, " S"]  # mean over contexts of Eq. 3
    tv: Float[Array, " S"]  # mean over contexts of TV(π, π*)


def random_bandit(
    rng: PRNGKeyArray,
    n_contexts: int,
    n_arms: int,
    *,
    reward_scale: float = 1.0,
    ref_scale: float = 1.0,
) -> Bandit:
    """A random bandit: ref_logits ~ ref_scale·N(0, 1) and r(x, y) ~ reward_scale·N(0, 1)."""
    noise = jax.random.normal(rng, (2, n_contexts, n_arms))  # [2, X, K]
    return Bandit(ref_logits=ref_scale * noise[0], rewards=reward_scale * noise[1])


def optimal_policy(
    ref_probs: Float[Array, "*batch K"], rewards: Float[Array, "*batch K"], beta: Scalar
) -> Float[Array, "*batch K"]:
    """Optimum of Eq. 3: π*(y|x) = π_ref(y|x) exp(r(x,y)/β) / Z(x) (Eq. 4).

    Args:
      ref_probs: π_ref(·|x), [..., K].
      rewards: r(x, ·), [..., K].
      beta: KL coefficient β > 0.
    Returns:
      π*(·|x), [..., K].
    """
    # log space: exp(r/β) overflows for small β; log 0 = -inf gives π* = 0 there
    return jax.nn.softmax(jnp.log(ref_probs) + rewards / beta, axis=-1)


def optimal_value(
    ref_probs: Float[Array, "*batch K"], rewards: Float[Array, "*batch K"], beta: Scalar
) -> Float[Array, "*batch"]:
    """Maximum of Eq. 3 per context: β log Z(x), Z(x) = Σ_y π_ref(y|x) exp(r(x,y)/β) (Eq. 4).

    Args:
      ref_probs: π_ref(·|x), [..., K].
      rewards: r(x, ·), [..., K].
      beta: KL coefficient β > 0.
    Returns:
      max_π Σ_y π(y|x) r(x,y) - β KL(π(·|x) ‖ π_ref(·|x)), [...].
    """
    return beta * jax.nn.logsumexp(jnp.log(ref_probs) + rewards / beta, axis=-1)


def kl_regularized_objective(
    probs: Float[Array, "*batch K"],
    ref_probs: Float[Array, "*batch K"],
    rewards: Float[Array, "*batch K"],
    beta: Scalar,
) -> Float[Array, "*batch"]:
    """Eq. 3 per context: Σ_y π(y|x) r(x,y) - β KL(π(·|x) ‖ π_ref(·|x)).

    Args:
      probs: π(·|x), [..., K]; entries may be 0 (0·log 0 = 0).
      ref_probs: π_ref(·|x), [..., K]; KL is +inf where π_ref = 0 < π.
      rewards: r(x, ·), [..., K].
      beta: KL coefficient β.
    Returns:
      The objective, [...].
    """
    # xlogy(0, ·) = 0: arms with π = 0 contribute nothing to the KL
    kl = jnp.sum(xlogy(probs, probs) - xlogy(probs, ref_probs), axis=-1)  # [...]
    return jnp.sum(probs * rewards, axis=-1) - beta * kl


def tv_distance(p: Float[Array, "*batch K"], q: Float[Array, "*batch K"]) -> Float[Array, "*batch"]:
    """Total-variation distance ½ Σ_y |p(y) - q(y)| per context."""
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def evaluate_policy(
    probs: Float[Array, "X K"], bandit: Bandit, beta: Scalar
) -> dict[str, Float[Array, ""]]:
    """Distance of a policy to the optimum of Eq. 3, averaged over (uniform) contexts.

    Args:
      probs: π(·|x), [X, K].
      bandit: the bandit.
      beta: KL coefficient β of Eq. 3.
    Returns:
      `tv`: mean_x TV(π(·|x), π*(·|x)) with π* from Eq. 4; `value_gap`: mean_x of
      β log Z(x) minus Eq. 3 at π (≥ 0, and 0 only at π*); `objective`: mean_x of Eq. 3 at π.
    """
    ref_probs = bandit.ref_probs
    objective = kl_regularized_objective(probs, ref_probs, bandit.rewards, beta)  # [X]
    optimum = optimal_value(ref_probs, bandit.rewards, beta)  # [X]
    target = optimal_policy(ref_probs, bandit.rewards, beta)  # [X, K]
    return {
        "tv": jnp.mean(tv_distance(probs, target)),
        "value_gap": jnp.mean(optimum - objective),
        "objective": jnp.mean(objective),
    }


def bradley_terry_preferences(
    rng: PRNGKeyArray,
    rewards: Float[Array, "X K"],
    ref_probs: Float[Array, "X K"],
    n_pairs: int,
    *,
    label_noise: Scalar = 0.0,
) -> Preferences:
    """Sample comparisons: x uniform, y1, y2 ~ π_ref(·|x) independently, y1 wins w.p. σ(r1 - r2).

    The winner follows the Bradley-Terry model (Eq. 1), p(y1 ≻ y2 | x) = σ(r(x,y1) - r(x,y2)); with
    `label_noise` = ε each label is then flipped with probability ε (the noise model of
    conservative/robust DPO).

    Args:
      rng: key.
      rewards: r(x, y), [X, K].
      ref_probs: π_ref(y|x), [X, K] (the policy that generated the pairs).
      n_pairs: number of comparisons N.
      label_noise: flip probability ε in [0, 0.5).
    Returns:
      Preferences(x, chosen, rejected), each [N] int32.
    """
    n_contexts = rewards.shape[0]
    u = jax.random.uniform(rng, (4, n_pairs))  # [4, N]: one draw, see _inverse_cdf
    x = jnp.minimum(jnp.floor(u[0] * n_contexts).astype(jnp.int32), n_contexts - 1)  # [N]
    y1 = _inverse_cdf(ref_probs[x], u[1])  # [N]
    y2 = _inverse_cdf(ref_probs[x], u[2])  # [N]
    p_y1_wins = jax.nn.sigmoid(rewards[x, y1] - rewards[x, y2])  # [N], Eq. 1
    p_y1_wins = (1.0 - label_noise) * p_y1_wins + label_noise * (1.0 - p_y1_wins)
    y1_wins = u[3] < p_y1_wins  # [N]
    return Preferences(
        x=x.astype(jnp.int32),
        chosen=jnp.where(y1_wins, y1, y2).astype(jnp.int32),
        rejected=jnp.where(y1_wins, y2, y1).astype(jnp.int32),
    )


def _inverse_cdf(
    probs: Float[Array, "*batch K"], u: Float[Array, "*batch"]
) -> Int[Array, "*batch"]:
    """Sample y ~ probs from u ~ U[0, 1): y = #{k < K-1 : u >= cdf_k}.

    Used instead of jax.random.categorical so that a sampler makes a single uniform draw: on CPU
    each jax.random call site compiles its own threefry kernel, which dominates compile time here.
    """
    cdf = jnp.cumsum(probs, axis=-1)[..., :-1]  # [..., K-1]; the last arm takes the rest
    return jnp.sum(u[..., None] >= cdf, axis=-1).astype(jnp.int32)


def preference_weights(prefs: Preferences, n_contexts: int, n_arms: int) -> Float[Array, "X K K"]:
    """Empirical frequencies W[x, y_w, y_l] of sampled comparisons (sums to 1).

    A loss averaged over the N pairs equals Σ_{x,w,l} W[x,w,l] · loss(x, w, l), so training on the
    table costs X·K·K per step whatever N is.
    """
    n = prefs.x.shape[0]
    counts = jnp.zeros((n_contexts, n_arms, n_arms), jnp.float32)
    return counts.at[prefs.x, prefs.chosen, prefs.rejected].add(1.0) / n


def expected_preference_pairs(
    ref_probs: Float[Array, "X K"], rewards: Float[Array, "X K"], *, label_noise: Scalar = 0.0
) -> Float[Array, "X K K"]:
    """Infinite (expected) preference data: the limit of `preference_weights` as N → ∞.

    W[x, a, b] = P(winner a, loser b, context x) = (2/X) π_ref(a|x) π_ref(b|x) p(a ≻ b | x): the
    pair is drawn as (y1, y2) = (a, b) or (b, a), each with probability π_ref(a|x) π_ref(b|x),
    and a wins with p from Eq. 1, σ(r(x,a) - r(x,b)), mixed with its flip by `label_noise` (on the
    diagonal a = b this gives π_ref(a|x)²/X). With full-support π_ref, sigmoid DPO on this data has
    the unique optimum π* (Eq. 4): per pair it is a logistic regression whose solution
    β h = r(x,a) - r(x,b) is realizable (Rafailov et al. 2023, Thm. 1).

    Args:
      ref_probs: π_ref(y|x), [X, K].
      rewards: r(x, y), [X, K].
      label_noise: flip probability ε in [0, 0.5).
    Returns:
      W, [X, K, K] (winner axis 1, loser axis 2), summing to 1.
    """
    p_win = jax.nn.sigmoid(rewards[:, :, None] - rewards[:, None, :])  # [X, K, K], Eq. 1
    p_win = (1.0 - label_noise) * p_win + label_noise * (1.0 - p_win)
    pair_probs = ref_probs[:, :, None] * ref_probs[:, None, :]  # [X, K, K]
    return 2.0 * pair_probs * p_win / rewards.shape[0]


def ipo_fixed_point(
    ref_probs: Float[Array, "X K"], weights: Float[Array, "X K K"], beta: Scalar
) -> Float[Array, "X K"]:
    """Minimizer of the IPO loss Σ W[x,a,b] (h_ab - 1/(2β))² over policy tables (Azar et al. 2023).

    With u = log π - log π_ref, h_ab = u_a - u_b, so the loss is a weighted least-squares problem
    whose normal equations, per context, are the graph-Laplacian system
    Σ_b S_ab (u_a - u_b) = (Σ_b W_ab - Σ_b W_ba) / (2β), S = W + Wᵀ; u is unique up to a constant
    when the comparison graph is connected. Unlike π* (Eq. 4) it depends on the rewards only
    through the preference probabilities.

    Args:
      ref_probs: π_ref(y|x), [X, K] (full support).
      weights: preference table W[x, winner, loser], [X, K, K].
      beta: IPO's β.
    Returns:
      π_IPO(·|x) ∝ π_ref(·|x) exp(u_x), [X, K].
    """
    sym = weights + jnp.swapaxes(weights, -1, -2)  # [X, K, K]
    laplacian = jax.vmap(jnp.diag)(sym.sum(-1)) - sym  # [X, K, K]
    rhs = (weights.sum(-1) - weights.sum(-2)) / (2.0 * beta)  # [X, K]
    u = jnp.einsum("xab,xb->xa", jnp.linalg.pinv(laplacian, hermitian=True), rhs)  # [X, K]
    return jax.nn.softmax(jnp.log(ref_probs) + u, axis=-1)


def k3_in_loss_fixed_point(
    ref_probs: Float[Array, "*batch K"],
    rewards: Float[Array, "*batch K"],
    beta: Scalar,
    *,
    iters: int = 100,
) -> Float[Array, "*batch K"]:
    """The fixed point of a policy gradient on r with β·k3 IN THE LOSS (GRPO's form), sampled
    from the current policy: it is not π* of Eq. 4.

    The k3 term's expected gradient is `E_{y~π}[(1 - π_ref(y)/π(y)) ∇log π(y)] = -Σ_y π_ref(y)
    ∇log π(y)`, the gradient of the REVERSE KL(π_ref ‖ π), not of KL(π ‖ π_ref). With softmax
    logits the stationarity condition `π(y)(r(y) - E_π r) = β (π(y) - π_ref(y))` gives

        π(y) = β π_ref(y) / (β + c - r(y)),   c = E_π[r],

    with c the root of Σ_y π(y) = 1 in (max r - β, max r]: the sum decreases in c, is infinite at
    max r - β and ≤ Σ π_ref = 1 at max r; found by bisection. An unbiased pg term scaled by s (a
    mean baseline over G samples: s = 1 - 1/G) has the fixed point of `beta / s`.

    Args:
      ref_probs: [..., K] π_ref(·|x).
      rewards: [..., K] r(x, ·).
      beta: the KL coefficient (> 0), or the effective β / s.
      iters: bisection steps (float32 converges well before 100).
    Returns:
      [..., K] the fixed-point policy.
    """
    check_positive("beta", beta)
    top = jnp.max(rewards, axis=-1, keepdims=True)  # [..., 1]

    def total(c):
        return jnp.sum(beta * ref_probs / (beta + c - rewards), axis=-1, keepdims=True)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_big = total(mid) > 1.0  # the sum decreases in c: the root is above mid
        return jnp.where(too_big, mid, lo), jnp.where(too_big, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, bisect, (top - beta, top))
    probs = beta * ref_probs / (beta + hi - rewards)
    return probs / jnp.sum(probs, axis=-1, keepdims=True)


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
    y = _inverse_cdf(probs, u)  # [X, M]
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
