"""Tests for rlhf_jax.losses.dpo against float64 NumPy references and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax import losses

RTOL, ATOL = 1e-5, 1e-6
LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust"]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x))


def ref_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    out = []
    for b in range(len(pc)):
        h = (float(pc[b]) - float(rc[b])) - (float(pr[b]) - float(rr[b]))
        z = beta * h
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
        elif loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - z))
        else:
            out.append(((1 - eps) * -log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps))
    return np.array(out)


def random_logps(seed, B=8):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(-rng.uniform(1.0, 20.0, B).astype(np.float32)) for _ in range(4))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2), (2.0, 0.0)])
def test_dpo_matches_reference(loss_type, beta, eps):
    args = random_logps(0)
    got, metrics = losses.dpo_loss(*args, beta=beta, loss_type=loss_type, label_smoothing=eps)
    want = ref_dpo(*[np.asarray(a) for a in args], beta, loss_type, eps)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in args)
    np.testing.assert_allclose(metrics["chosen_rewards"], beta * (pc - rc), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["rejected_rewards"], beta * (pr - rr), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        metrics["margins"], beta * ((pc - rc) - (pr - rr)), rtol=RTOL, atol=1e-5
    )
    np.testing.assert_array_equal(metrics["accuracies"], (pc - rc > pr - rr).astype(np.float32))


def test_dpo_golden_values():
    z = jnp.zeros(3)
    ones = jnp.ones(3)
    # h = 0: sigmoid loss is log 2 for any beta and label smoothing; robust too
    for eps in [0.0, 0.1, 0.4]:
        for lt in ["sigmoid", "robust"]:
            loss, _ = losses.dpo_loss(z, z, z, z, beta=0.3, loss_type=lt, label_smoothing=eps)
            np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
    # h = 0: ipo gives (1/(2 beta))^2 = 25 at beta 0.1, hinge gives 1
    loss, _ = losses.dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo")
    np.testing.assert_allclose(loss, 25.0, rtol=1e-6)
    loss, _ = losses.dpo_loss(z, z, z, z, beta=0.1, loss_type="hinge")
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
    # h = 2 with beta = 0.5: sigmoid gives log(1 + e^-1); hinge is exactly at the kink -> 0
    loss, m = losses.dpo_loss(ones, -ones, z, z, beta=0.5)
    np.testing.assert_allclose(loss, math.log1p(math.exp(-1.0)), rtol=1e-6)
    np.testing.assert_allclose(m["chosen_rewards"], 0.5)
    np.testing.assert_allclose(m["rejected_rewards"], -0.5)
    loss, _ = losses.dpo_loss(ones, -ones, z, z, beta=0.5, loss_type="hinge")
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)


def test_dpo_stable_for_large_margins():
    big = jnp.array([1e4, -1e4])
    z = jnp.zeros(2)
    for lt in LOSS_TYPES:

        def total(pc, lt=lt):
            return losses.dpo_loss(pc, z, z, z, beta=1.0, loss_type=lt, label_smoothing=0.1)[
                0
            ].sum()

        value, grad = jax.jit(jax.value_and_grad(total))(big)
        assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_robust_with_zero_smoothing_equals_sigmoid():
    args = random_logps(3)
    a, _ = losses.dpo_loss(*args, beta=0.3, loss_type="robust")
    b, _ = losses.dpo_loss(*args, beta=0.3, loss_type="sigmoid")
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_check_grads_and_jit(loss_type):
    args = random_logps(1, B=4)
    order = 1 if loss_type == "hinge" else 2

    def f(*a):
        return losses.dpo_loss(*a, beta=0.2, loss_type=loss_type, label_smoothing=0.1)[0]

    check_grads(jax.jit(f), args, order=order, modes=["rev"], eps=1e-3, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(jax.jit(f)(*args), f(*args), rtol=1e-6, atol=1e-6)


def test_dpo_vmap_and_jit_over_traced_beta():
    args = random_logps(2)
    betas = jnp.array([0.05, 0.1, 1.0])

    def f(beta):
        return losses.dpo_loss(*args, beta=beta, label_smoothing=0.1)[0]

    got = jax.jit(jax.vmap(f))(betas)
    for i, beta in enumerate([0.05, 0.1, 1.0]):
        want = ref_dpo(*[np.asarray(a) for a in args], beta, "sigmoid", 0.1)
        np.testing.assert_allclose(got[i], want, rtol=RTOL, atol=1e-5)
    # every loss type and the other beta-taking losses also trace with a batched beta
    fns = [lambda b, lt=lt: losses.dpo_loss(*args, beta=b, loss_type=lt)[0] for lt in LOSS_TYPES]
    fns.append(lambda b: losses.simpo_loss(args[0], args[1], beta=b))
    fns.append(lambda b: losses.dpo_loss(*args, label_smoothing=0.1 * b)[0])
    for fn in fns:
        assert jax.eval_shape(jax.vmap(fn), betas).shape == (3, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(loss_type="kto"), "sigmoid, ipo, hinge, robust"),
        (dict(label_smoothing=0.5), r"\[0, 0.5\)"),
        (dict(label_smoothing=-0.1), r"\[0, 0.5\)"),
    ],
)
def test_dpo_invalid_arguments(kwargs, match):
    args = random_logps(0, B=2)
    with pytest.raises(ValueError, match=match):
        losses.dpo_loss(*args, **kwargs)


def test_simpo_matches_reference_and_validates():
    rng = np.random.default_rng(4)
    c, r = (-rng.uniform(0.1, 3.0, 6).astype(np.float32) for _ in range(2))
    got = losses.simpo_loss(jnp.asarray(c), jnp.asarray(r), beta=2.5, gamma=0.7)
    want = [-log_sigmoid(2.5 * (float(a) - float(b)) - 0.7) for a, b in zip(c, r)]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # golden: equal log-probs, gamma = 0 -> log 2
    np.testing.assert_allclose(
        losses.simpo_loss(jnp.zeros(2), jnp.zeros(2), gamma=0.0), math.log(2.0), rtol=1e-6
    )
    with pytest.raises(ValueError, match="beta"):
        losses.simpo_loss(jnp.asarray(c), jnp.asarray(r), beta=0.0)


def ref_log_odds(p):
    return p - math.log(1.0 - math.exp(p))


def test_orpo_matches_reference():
    rng = np.random.default_rng(5)
    c, r = (-rng.uniform(0.01, 5.0, 8).astype(np.float32) for _ in range(2))
    got = losses.orpo_odds_ratio_loss(jnp.asarray(c), jnp.asarray(r))
    want = [-log_sigmoid(ref_log_odds(float(a)) - ref_log_odds(float(b))) for a, b in zip(c, r)]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # golden: equal probabilities -> log 2;
    # p = 1/2 vs p = 1/4 -> odds 1 vs 1/3 -> -log sigmoid(log 3) = log(1 + 1/3)
    half, quarter = jnp.array([math.log(0.5)]), jnp.array([math.log(0.25)])
    np.testing.assert_allclose(losses.orpo_odds_ratio_loss(half, half), math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(
        losses.orpo_odds_ratio_loss(half, quarter), math.log1p(1.0 / 3.0), rtol=1e-6
    )


def test_orpo_stable_near_zero_and_far_from_zero():
    # both log1mexp branches (p > -ln 2 and p < -ln 2) and extreme values agree with float64
    c = jnp.array([-60.0, -1e-3, -1e-5, -0.69, -0.7])
    r = jnp.array([-1e-4, -1e-3, -80.0, -0.7, -0.69])
    got = losses.orpo_odds_ratio_loss(c, r)
    want = [-log_sigmoid(ref_log_odds(float(a)) - ref_log_odds(float(b))) for a, b in zip(c, r)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # log p is clipped to <= -1e-6: p = 0 (probability 1) behaves as p = -1e-6, finite
    edge_c, edge_r = jnp.array([0.0, -1e-9, -2.0]), jnp.array([-2.0, -2.0, 0.0])
    clipped_c, clipped_r = jnp.array([-1e-6, -1e-6, -2.0]), jnp.array([-2.0, -2.0, -1e-6])
    np.testing.assert_allclose(
        losses.orpo_odds_ratio_loss(edge_c, edge_r),
        losses.orpo_odds_ratio_loss(clipped_c, clipped_r),
        rtol=1e-6,
    )
    val, grads = jax.jit(
        jax.value_and_grad(lambda c, r: losses.orpo_odds_ratio_loss(c, r).sum(), argnums=(0, 1))
    )(jnp.concatenate([c, edge_c]), jnp.concatenate([r, edge_r]))
    assert np.isfinite(val)
    assert all(np.all(np.isfinite(g)) for g in grads)


def ref_unlikelihood(clp, cm, rlp, rm, alpha):
    out = []
    for b in range(clp.shape[0]):
        cs = [float(clp[b, t]) for t in range(clp.shape[1]) if cm[b, t]]
        rs = [float(rlp[b, t]) for t in range(rlp.shape[1]) if rm[b, t]]
        nll = -sum(cs) / max(len(cs), 1)
        ul = -sum(math.log(1.0 - math.exp(x)) for x in rs) / max(len(rs), 1)
        out.append(nll + alpha * ul)
    return np.array(out)


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.int32, np.float32])
def test_unlikelihood_matches_reference(mask_dtype):
    rng = np.random.default_rng(6)
    B, T = 4, 5
    clp = -rng.uniform(0.01, 4.0, (B, T)).astype(np.float32)
    rlp = -rng.uniform(0.01, 4.0, (B, T)).astype(np.float32)
    cm = np.zeros((B, T), mask_dtype)
    rm = np.zeros((B, T), mask_dtype)
    for b, (lc, lr) in enumerate([(5, 5), (2, 3), (0, 4), (3, 0)]):  # ends early, empty rows
        cm[b, :lc] = 1
        rm[b, :lr] = 1
    rlp[1, 4] = 0.0  # padding with p = 1 must not matter
    got = losses.unlikelihood_loss(
        jnp.asarray(clp), jnp.asarray(cm), jnp.asarray(rlp), jnp.asarray(rm), alpha=0.5
    )
    np.testing.assert_allclose(got, ref_unlikelihood(clp, cm, rlp, rm, 0.5), rtol=RTOL, atol=1e-5)
    grads = jax.jit(
        jax.grad(
            lambda a, b: losses.unlikelihood_loss(a, jnp.asarray(cm), b, jnp.asarray(rm)).sum(),
            argnums=(0, 1),
        )
    )(jnp.asarray(clp), jnp.asarray(rlp))
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert grads[1][1, 4] == 0.0


def test_simpo_orpo_unlikelihood_jit():
    rng = np.random.default_rng(7)
    c, r = (jnp.asarray(-rng.uniform(0.1, 3.0, 4).astype(np.float32)) for _ in range(2))
    m = jnp.ones((4, 3))
    for f, args in [
        (losses.simpo_loss, (c, r)),
        (losses.orpo_odds_ratio_loss, (c, r)),
        (losses.unlikelihood_loss, (c[:, None] * m, m, r[:, None] * m, m)),
    ]:
        np.testing.assert_allclose(jax.jit(f)(*args), f(*args), rtol=1e-6, atol=1e-6)
