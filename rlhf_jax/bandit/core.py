"""Tabular contextual bandit: the closed-form testbed for the KL-regularized objective.

Contexts x are uniform over X values, arms y over K values; the reference policy is
π_ref(y|x) = softmax(ref_logits[x]) and the reward table is r(x, y). On this bandit the optimum of
Eq. 3 is known in closed form (Eq. 4), so the fixed point of every learner (`bandit.training`) can
be checked against π* exactly. This module holds the bandit, the closed forms (Eq. 3, Eq. 4, the
IPO and k3-in-the-loss fixed points) and Bradley-Terry preference sampling (Eq. 1).

Shape letters: X contexts, K arms, N preference pairs, M samples per context. Pure and un-jitted.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, Real

from rlhf_jax.errors import check_positive

Scalar = Real[ArrayLike, ""]


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
    u = jax.random.uniform(rng, (4, n_pairs))  # [4, N]: one draw, see inverse_cdf
    x = jnp.minimum(jnp.floor(u[0] * n_contexts).astype(jnp.int32), n_contexts - 1)  # [N]
    y1 = inverse_cdf(ref_probs[x], u[1])  # [N]
    y2 = inverse_cdf(ref_probs[x], u[2])  # [N]
    p_y1_wins = jax.nn.sigmoid(rewards[x, y1] - rewards[x, y2])  # [N], Eq. 1
    p_y1_wins = (1.0 - label_noise) * p_y1_wins + label_noise * (1.0 - p_y1_wins)
    y1_wins = u[3] < p_y1_wins  # [N]
    return Preferences(
        x=x.astype(jnp.int32),
        chosen=jnp.where(y1_wins, y1, y2).astype(jnp.int32),
        rejected=jnp.where(y1_wins, y2, y1).astype(jnp.int32),
    )


def inverse_cdf(probs: Float[Array, "*batch K"], u: Float[Array, "*batch"]) -> Int[Array, "*batch"]:
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
