"""Tests of rlhf_jax.bandit against NumPy formulas, plain loops and the closed form of Eq. 4."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import bandit as bd

BETAS = (0.3, 1.0, 5.0)


def _np_random_problem(seed, shape=(4, 5)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape)
    ref = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    rewards = rng.normal(size=shape)
    return ref, rewards


def _np_objective_loop(probs, ref, rewards, beta):
    """Eq. 3 per context with explicit loops (0 log 0 = 0)."""
    out = []
    for p_x, q_x, r_x in zip(probs, ref, rewards):
        value = 0.0
        for p, q, r in zip(p_x, q_x, r_x):
            value += p * r
            if p > 0:
                value -= beta * p * math.log(p / q)
        out.append(value)
    return np.array(out)


def _random_bandits(seed, n, n_contexts=4, n_arms=5):
    """n random bandits stacked on a leading axis (drawn by NumPy: no compilation)."""
    rng = np.random.default_rng(seed)
    return bd.Bandit(
        ref_logits=jnp.asarray(rng.normal(size=(n, n_contexts, n_arms)), jnp.float32),
        rewards=jnp.asarray(rng.normal(size=(n, n_contexts, n_arms)), jnp.float32),
    )


@pytest.mark.parametrize("beta", BETAS)
def test_optimal_policy_matches_numpy(beta):
    ref, rewards = _np_random_problem(0)
    unnormalized = ref * np.exp(rewards / beta)  # Eq. 4
    expected = unnormalized / unnormalized.sum(-1, keepdims=True)
    got = bd.optimal_policy(jnp.asarray(ref, jnp.float32), jnp.asarray(rewards, jnp.float32), beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(bd.optimal_policy)(jnp.asarray(ref), jnp.asarray(rewards), beta), got, atol=1e-6
    )


def test_optimal_policy_is_stable_for_tiny_beta_and_zero_ref():
    ref = jnp.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    rewards = jnp.array([[100.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    pi = bd.optimal_policy(ref, rewards, 1e-3)  # exp(r/β) overflows float32 without log space
    np.testing.assert_allclose(pi, [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], atol=1e-6)
    assert np.isfinite(bd.optimal_value(ref, rewards, 1e-3)).all()


def test_kl_regularized_objective_matches_loop():
    ref, rewards = _np_random_problem(1)
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(5), size=4)
    probs[0, 1] = 0.0  # 0 log 0 = 0
    probs[0] /= probs[0].sum()
    probs[2] = np.eye(5)[3]  # deterministic policy
    for beta in BETAS:
        expected = _np_objective_loop(probs, ref, rewards, beta)
        got = bd.kl_regularized_objective(
            jnp.asarray(probs, jnp.float32),
            jnp.asarray(ref, jnp.float32),
            jnp.asarray(rewards, jnp.float32),
            beta,
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_kl_regularized_objective_is_minus_inf_off_reference_support():
    ref = jnp.array([[0.0, 1.0]])
    value = bd.kl_regularized_objective(jnp.array([[0.5, 0.5]]), ref, jnp.ones((1, 2)), 1.0)
    assert value[0] == -np.inf


@pytest.mark.parametrize("beta", BETAS)
def test_maximum_of_objective_is_beta_log_z(beta):
    ref, rewards = _np_random_problem(3)
    closed_form = beta * np.log(np.sum(ref * np.exp(rewards / beta), axis=-1))
    ref_j, rewards_j = jnp.asarray(ref, jnp.float32), jnp.asarray(rewards, jnp.float32)
    pi = bd.optimal_policy(ref_j, rewards_j, beta)
    np.testing.assert_allclose(
        bd.kl_regularized_objective(pi, ref_j, rewards_j, beta), closed_form, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(bd.optimal_value(ref_j, rewards_j, beta), closed_form, rtol=1e-5)


@pytest.mark.parametrize("beta", BETAS)
def test_optimal_policy_beats_perturbations_and_random_policies(beta):
    ref, rewards = _np_random_problem(4)
    ref_j, rewards_j = jnp.asarray(ref, jnp.float32), jnp.asarray(rewards, jnp.float32)
    pi = np.asarray(bd.optimal_policy(ref_j, rewards_j, beta), np.float64)
    best = _np_objective_loop(pi, ref, rewards, beta)
    rng = np.random.default_rng(5)
    for scale in (1e-2, 1e-1, 1.0):
        logits = np.log(pi) + scale * rng.normal(size=(50, *pi.shape))  # [50, X, K]
        perturbed = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        for p in perturbed:
            assert (_np_objective_loop(p, ref, rewards, beta) < best + 1e-12).all()
    for p in rng.dirichlet(np.ones(pi.shape[-1]), size=(50, pi.shape[0])):
        assert (_np_objective_loop(p, ref, rewards, beta) < best).all()
    # the gap is β KL(π ‖ π*) (the derivation of Eq. 4)
    p = perturbed[0]
    gap = best - _np_objective_loop(p, ref, rewards, beta)
    np.testing.assert_allclose(gap, beta * np.sum(p * np.log(p / pi), -1), rtol=1e-4, atol=1e-7)


def test_tv_distance_and_evaluate_policy():
    ref, rewards = _np_random_problem(6)
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(5), size=4)
    beta = 0.7
    unnormalized = ref * np.exp(rewards / beta)
    target = unnormalized / unnormalized.sum(-1, keepdims=True)
    tv = [0.5 * sum(abs(a - b) for a, b in zip(p, t)) for p, t in zip(probs, target)]
    bandit = bd.Bandit(jnp.asarray(np.log(ref), jnp.float32), jnp.asarray(rewards, jnp.float32))
    metrics = bd.evaluate_policy(jnp.asarray(probs, jnp.float32), bandit, beta)
    np.testing.assert_allclose(metrics["tv"], np.mean(tv), rtol=1e-5)
    gap = beta * np.log(unnormalized.sum(-1)) - _np_objective_loop(probs, ref, rewards, beta)
    np.testing.assert_allclose(metrics["value_gap"], gap.mean(), rtol=1e-4, atol=1e-6)


def test_expected_preference_pairs_matches_loop():
    ref, rewards = _np_random_problem(8, shape=(3, 4))
    for noise in (0.0, 0.2):
        expected = np.zeros((3, 4, 4))  # enumerate draws (x, y1, y2) and both outcomes
        for x in range(3):
            for y1 in range(4):
                for y2 in range(4):
                    p = 1.0 / (1.0 + math.exp(-(rewards[x, y1] - rewards[x, y2])))  # Eq. 1
                    p = (1 - noise) * p + noise * (1 - p)
                    p_draw = ref[x, y1] * ref[x, y2] / 3
                    expected[x, y1, y2] += p_draw * p
                    expected[x, y2, y1] += p_draw * (1 - p)
        got = bd.expected_preference_pairs(
            jnp.asarray(ref, jnp.float32), jnp.asarray(rewards, jnp.float32), label_noise=noise
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-5)


def test_preference_weights_matches_counting_loop():
    prefs = bd.Preferences(
        x=jnp.array([0, 1, 1, 0, 1], jnp.int32),
        chosen=jnp.array([2, 0, 0, 1, 2], jnp.int32),
        rejected=jnp.array([1, 2, 2, 1, 0], jnp.int32),
    )
    expected = np.zeros((2, 3, 3))
    for x, w, lo in zip(*map(np.asarray, prefs)):
        expected[x, w, lo] += 1 / 5
    np.testing.assert_allclose(bd.preference_weights(prefs, 2, 3), expected, atol=1e-7)


def test_bradley_terry_sampler_frequencies():
    n_contexts, n_arms, n = 2, 3, 200_000
    bandit = bd.random_bandit(jax.random.key(3), n_contexts, n_arms)
    sample = jax.jit(
        lambda rng, noise: bd.bradley_terry_preferences(
            rng, bandit.rewards, bandit.ref_probs, n, label_noise=noise
        )
    )
    ref, rewards = np.asarray(bandit.ref_probs, np.float64), np.asarray(bandit.rewards, np.float64)
    for seed, noise in enumerate([0.0, 0.25]):
        prefs = sample(jax.random.key(seed), noise)
        x, win, lose = map(np.asarray, prefs)
        for cx in range(n_contexts):
            for a in range(n_arms):
                for b in range(a + 1, n_arms):
                    a_wins = np.sum((x == cx) & (win == a) & (lose == b))
                    b_wins = np.sum((x == cx) & (win == b) & (lose == a))
                    pairs = a_wins + b_wins  # unordered pair {a, b}: P = 2 π_ref(a) π_ref(b) / X
                    p_pair = 2 * ref[cx, a] * ref[cx, b] / n_contexts
                    assert abs(pairs / n - p_pair) < 5 * math.sqrt(p_pair * (1 - p_pair) / n)
                    p = 1 / (1 + math.exp(-(rewards[cx, a] - rewards[cx, b])))  # Eq. 1
                    p = (1 - noise) * p + noise * (1 - p)
                    assert abs(a_wins / pairs - p) < 5 * math.sqrt(p * (1 - p) / pairs)
        # and the empirical table tends to the expected one
        weights = np.asarray(bd.preference_weights(prefs, n_contexts, n_arms))
        expected = np.asarray(
            bd.expected_preference_pairs(bandit.ref_probs, bandit.rewards, label_noise=noise)
        )
        assert (
            np.abs(weights - expected) < 5 * np.sqrt(expected * (1 - expected) / n) + 1e-6
        ).all()


def _train(method, bandits, weights, betas, steps, **kwargs):
    """Final policies [bandits, β, X, K]: one jit over vmap(bandits) ∘ vmap(β), one rng."""
    train = functools.partial(bd.train_policy, method, steps=steps, **kwargs)

    def one(bandit, w, rng):
        logits = jax.vmap(lambda beta: train(bandit, w, beta, rng).logits)(betas)
        return jax.nn.softmax(logits, axis=-1)

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))(bandits, weights, jax.random.key(0))


@jax.jit
def _tv_to_optimum(policies, bandits, betas):
    target = jax.vmap(
        lambda b: jax.vmap(lambda beta: bd.optimal_policy(b.ref_probs, b.rewards, beta))(betas)
    )(bandits)
    return 0.5 * jnp.abs(policies - target).sum(-1).mean(-1)  # [bandits, β]


@jax.jit
def _expected_weights(bandits, label_noise=0.0):
    return jax.vmap(
        lambda b: bd.expected_preference_pairs(b.ref_probs, b.rewards, label_noise=label_noise)
    )(bandits)


TRAIN_BETAS = np.array([0.5, 2.0], np.float32)


def test_dpo_on_expected_preferences_converges_to_optimal_policy():
    bandits = _random_bandits(10, 3)
    policies = _train("dpo", bandits, _expected_weights(bandits), TRAIN_BETAS, steps=500, lr=0.05)
    tv = _tv_to_optimum(policies, bandits, TRAIN_BETAS)
    assert tv.max() < 0.02, tv


# Tolerances on the final TV to π*, max over 3 bandits × β ∈ {0.5, 2}, set between what the
# method reaches and what its plausible one-line bugs reach (measured on the same seeds):
#   method    settings                          correct  clip(ρ, 1+ε, 1+ε)  no clip  KL sign flipped
#   ppo       300 steps, lr 0.05, 4 epochs      0.0005   0.0080             0.0005   0.65
#   ppo       100 steps, lr 0.3, 8 epochs       0.0046   0.057              0.65     0.61
#   exact_pg  300 steps, lr 0.05                0.0047   —                  —        0.65
#   pg        300 steps, lr 0.05, β = 0.5       0.0053   —                  —        0.32
# (over bandit seeds 10-19 the first row's correct run stays ≤ 0.0009 and the broken clip
# ≥ 0.0066.) The clip is only visible where ratios leave [1 - ε, 1 + ε]: at the optimum every
# leave-one-out advantage is 0, so PPO without its clip still converges at a gentle learning
# rate, and only the aggressive row separates it.
RL_TOLERANCES = {"ppo": 0.002, "exact_pg": 0.01}


@pytest.mark.parametrize("method", ["ppo", "exact_pg"])
def test_policy_gradient_converges_to_optimal_policy(method):
    """PPO (clipped surrogate on k1-KL-penalized rewards) and the exact gradient of Eq. 3 reach
    π* of Eq. 4; the tolerances (table above) fail under a broken clip or a flipped KL sign."""
    bandits = _random_bandits(11, 3)
    policies = _train(method, bandits, None, TRAIN_BETAS, steps=300, lr=0.05, n_samples=16)
    tv = _tv_to_optimum(policies, bandits, TRAIN_BETAS)
    assert tv.max() < RL_TOLERANCES[method], tv


def test_ppo_clip_keeps_aggressive_updates_on_course():
    """8 epochs per batch at lr 0.3: the clipped surrogate still reaches π* (TV 0.0046), while
    PPO without its clip (0.65) or with the clip range broken to [1+ε, 1+ε] (0.057) does not."""
    bandits = _random_bandits(11, 3)
    policies = _train(
        "ppo", bandits, None, TRAIN_BETAS, steps=100, lr=0.3, n_samples=16, ppo_epochs=8
    )
    tv = _tv_to_optimum(policies, bandits, TRAIN_BETAS)
    assert tv.max() < 0.02, tv


def test_reinforce_converges_and_jit_vmap_over_seeds_equals_seeds_one_by_one():
    """Seeds = (bandit, training key) pairs: one jit of vmap over seeds vs a jitted loop; the
    TV to π* (0.0053 at most) fails with the KL sign flipped (0.32)."""
    bandits = _random_bandits(14, 3)
    rngs = jax.random.split(jax.random.key(15), 3)
    beta = 0.5
    train = functools.partial(bd.train_policy, "pg", steps=300, n_samples=16)
    batched = jax.jit(jax.vmap(train, in_axes=(0, None, None, 0)))(bandits, None, beta, rngs)
    single = jax.jit(train)
    for i in range(3):
        bandit = bd.Bandit(*(a[i] for a in bandits))
        result = single(bandit, None, beta, rngs[i])
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(result)):
            np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)
        probs = jax.nn.softmax(result.logits)
        assert bd.evaluate_policy(probs, bandit, beta)["tv"] < 0.01


def test_robust_dpo_undoes_label_noise_and_dpo_does_not():
    bandits = _random_bandits(12, 3)
    noisy = _expected_weights(bandits, label_noise=0.2)
    robust = _train("robust", bandits, noisy, TRAIN_BETAS, steps=500, label_smoothing=0.2)
    assert _tv_to_optimum(robust, bandits, TRAIN_BETAS).max() < 0.02
    plain = _train("dpo", bandits, noisy, TRAIN_BETAS, steps=500)
    assert _tv_to_optimum(plain, bandits, TRAIN_BETAS).min() > 0.02


def _np_ipo_loss_grad(u, weights, beta):
    """Gradient in u of Σ_ab W_ab (u_a - u_b - 1/(2β))² for one context, by loops."""
    k = len(u)
    grad = np.zeros(k)
    for a in range(k):
        for b in range(k):
            residual = u[a] - u[b] - 1 / (2 * beta)
            grad[a] += 2 * weights[a, b] * residual
            grad[b] -= 2 * weights[a, b] * residual
    return grad


def test_ipo_fixed_point_is_stationary_and_ipo_training_reaches_it():
    bandits = _random_bandits(13, 3)
    weights = _expected_weights(bandits)
    fixed = jax.jit(
        jax.vmap(
            lambda b, w: jax.vmap(lambda beta: bd.ipo_fixed_point(b.ref_probs, w, beta))(
                TRAIN_BETAS
            )
        )
    )(bandits, weights)  # [bandits, β, X, K]
    for i in range(3):
        for j, beta in enumerate(np.asarray(TRAIN_BETAS)):
            for x in range(4):
                u = np.log(np.asarray(fixed[i, j, x], np.float64)) - np.log(
                    np.asarray(bandits.ref_probs[i, x], np.float64)
                )
                grad = _np_ipo_loss_grad(u, np.asarray(weights[i, x], np.float64), beta)
                np.testing.assert_allclose(grad, 0.0, atol=1e-5)
    policies = _train("ipo", bandits, weights, TRAIN_BETAS, steps=500)
    tv = np.asarray(0.5 * jnp.abs(policies - fixed).sum(-1).mean(-1))
    assert tv.max() < 0.02, tv
    assert _tv_to_optimum(fixed, bandits, TRAIN_BETAS).min() > 0.02  # IPO's optimum is not π*


def test_train_policy_rejects_bad_arguments():
    bandit = bd.random_bandit(jax.random.key(0), 2, 3)
    with pytest.raises(ValueError, match="expected one of"):
        bd.train_policy("sft", bandit, None, 1.0, jax.random.key(0), steps=1)
    with pytest.raises(ValueError, match="pair_weights"):
        bd.train_policy("dpo", bandit, None, 1.0, jax.random.key(0), steps=1)


def test_train_policy_takes_a_pairwise_loss_function_equal_to_the_builtin():
    """A hand-written sigmoid DPO loss (the pairwise contract) trains exactly as "dpo"."""

    def hand_dpo(pc, pr, rc, rr, *, beta):
        return -jax.nn.log_sigmoid(beta * ((pc - rc) - (pr - rr)))

    bandits = _random_bandits(16, 2)
    weights = _expected_weights(bandits)
    builtin = _train("dpo", bandits, weights, TRAIN_BETAS, steps=100)
    custom = _train(hand_dpo, bandits, weights, TRAIN_BETAS, steps=100)
    np.testing.assert_allclose(custom, builtin, rtol=1e-5, atol=1e-6)
    assert _tv_to_optimum(custom, bandits, TRAIN_BETAS).max() < 0.1  # and it moved towards π*
    with pytest.raises(ValueError, match="beta must be > 0"):
        bd.train_policy(hand_dpo, bd.Bandit(*(a[0] for a in bandits)), weights[0], -1.0,
                        jax.random.key(0), steps=1)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Critic-free methods: where the KL term sits decides the fixed point.
#
# Final TV over 3 bandits × β ∈ {0.5, 2}, G = 16 samples per context, 600 steps, lr 0.05
# (measured 2026-11-29, max over the 6 runs):
#                 KL in the reward   β k3 in the loss:
#   method        TV(π*)             TV(π*)   TV(π_k3(β))   TV(π_k3(βG/(G-1)))
#   grpo          0.0004             0.29     0.28          0.29
#   dr_grpo       0.0024             0.11     0.014         0.0080
#   rloo          0.0024             0.10     0.0055        0.013
#   reinforce_pp  0.0088             0.10     0.066         0.075
# With the KL in the reward (r - β k1, Eq. 3) every method reaches π*: at π* the penalised reward
# is β log Z(x) for every arm, so every advantage is 0 there whatever the baseline or scaling.
# With β k3 in the loss the expected gradient of the KL term is that of the REVERSE KL(π_ref ‖ π):
# an unbiased policy gradient (RLOO) converges to `k3_in_loss_fixed_point(β)`, one scaled by
# 1 - 1/G (the mean baseline, Dr. GRPO) to the same point at β G/(G-1); GRPO's per-group std and
# REINFORCE++'s batch whitening rescale the policy-gradient term by random factors, and converge
# elsewhere (no closed form).
CF_STEPS, CF_G = 600, 16


@functools.cache
def _critic_free(method, kl_in):
    bandits = _random_bandits(11, 3)
    policies = _train(
        method, bandits, None, TRAIN_BETAS, steps=CF_STEPS, lr=0.05, n_samples=CF_G, kl_in=kl_in
    )
    return bandits, np.asarray(policies)


@jax.jit
def _tv_to_k3_point(policies, bandits, betas, scale):
    target = jax.vmap(
        lambda b: jax.vmap(
            lambda beta: bd.k3_in_loss_fixed_point(b.ref_probs, b.rewards, beta / scale)
        )(betas)
    )(bandits)
    return 0.5 * jnp.abs(policies - target).sum(-1).mean(-1)


@pytest.mark.parametrize("method", bd.CRITIC_FREE_METHODS)
def test_critic_free_with_the_kl_in_the_reward_converges_to_the_optimum(method):
    bandits, policies = _critic_free(method, "reward")
    tv = _tv_to_optimum(policies, bandits, TRAIN_BETAS)
    assert tv.max() < 0.02, tv


@pytest.mark.parametrize(
    "method,scale", [("rloo", 1.0), ("dr_grpo", 1.0 - 1.0 / CF_G), ("grpo", None),
                     ("reinforce_pp", None)],
)  # fmt: skip
def test_critic_free_with_k3_in_the_loss_converges_elsewhere(method, scale):
    """Not to π*; RLOO and Dr. GRPO to the closed form of `k3_in_loss_fixed_point` (Dr. GRPO at
    β / (1 - 1/G)); GRPO and REINFORCE++ to neither (their scaling has no closed form)."""
    bandits, policies = _critic_free(method, "loss")
    assert _tv_to_optimum(policies, bandits, TRAIN_BETAS).max() > 0.05
    to_k3 = np.asarray(_tv_to_k3_point(policies, bandits, TRAIN_BETAS, 1.0))
    if scale is None:
        assert to_k3.max() > 0.05, to_k3
        return
    assert np.asarray(_tv_to_k3_point(policies, bandits, TRAIN_BETAS, scale)).max() < 0.02
    other = (1.0 - 1.0 / CF_G) if scale == 1.0 else 1.0  # the other β' is measurably worse
    worse = np.asarray(_tv_to_k3_point(policies, bandits, TRAIN_BETAS, other)).max()
    assert worse > np.asarray(_tv_to_k3_point(policies, bandits, TRAIN_BETAS, scale)).max()


@pytest.mark.parametrize("beta", [0.3, 1.0, 3.0])
def test_k3_in_loss_fixed_point_is_stationary_and_not_the_optimum(beta):
    """At the closed form, the exact expected gradient of E_π[r] + β k3-in-the-loss (samples from
    a frozen copy of π, as in training) is 0; at π* it is not, and vice versa for Eq. 3."""
    bandit = bd.random_bandit(jax.random.key(5), 3, 6)
    ref_logps = jax.nn.log_softmax(bandit.ref_logits, axis=-1)
    fixed = bd.k3_in_loss_fixed_point(bandit.ref_probs, bandit.rewards, beta)
    np.testing.assert_allclose(fixed.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(fixed) > 0)

    def k3_loss(logits, frozen):
        logps = jax.nn.log_softmax(logits, axis=-1)
        weights = jax.nn.softmax(frozen, axis=-1)  # the sampling distribution, no gradient
        log_r = ref_logps - logps
        k3 = jnp.expm1(log_r) - log_r
        pg = jax.lax.stop_gradient(
            weights * (bandit.rewards - (weights * bandit.rewards).sum(-1, keepdims=True))
        )
        return jnp.sum(-pg * logps + beta * weights * k3)

    def grad_at(probs):
        logits = jnp.log(probs)
        return np.asarray(jax.grad(k3_loss)(logits, logits))

    optimum = bd.optimal_policy(bandit.ref_probs, bandit.rewards, beta)
    assert np.abs(grad_at(fixed)).max() < 1e-5
    assert np.abs(grad_at(optimum)).max() > 1e-2
    assert float(bd.tv_distance(fixed, optimum).mean()) > 0.01
    # Eq. 3's own gradient vanishes at π*, not at the k3 point.
    eq3 = jax.grad(
        lambda lg: (
            -bd.kl_regularized_objective(
                jax.nn.softmax(lg), bandit.ref_probs, bandit.rewards, beta
            ).sum()
        )
    )
    assert np.abs(np.asarray(eq3(jnp.log(optimum)))).max() < 1e-5
    assert np.abs(np.asarray(eq3(jnp.log(fixed)))).max() > 1e-2


def test_kl_in_the_loss_is_refused_where_it_does_not_apply():
    bandit = bd.random_bandit(jax.random.key(0), 2, 3)
    with pytest.raises(ValueError, match="kl_in='loss' applies to"):
        bd.train_policy("ppo", bandit, None, 1.0, jax.random.key(0), steps=1, kl_in="loss")
    with pytest.raises(ValueError, match="kl_in must be one of"):
        bd.train_policy("grpo", bandit, None, 1.0, jax.random.key(0), steps=1, kl_in="both")
