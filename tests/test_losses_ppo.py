"""Tests for rlhf_jax.losses.ppo against plain-loop float64 references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax import losses

RTOL, ATOL = 1e-5, 1e-5
MASK_DTYPES = [np.bool_, np.int32, np.float32]
# full row, ends early, starts late (after a prompt) and ends early, empty, single token
SPANS = [(0, 7), (0, 3), (2, 5), (0, 0), (6, 7)]


def make_mask(dtype, spans=SPANS, T=7):
    m = np.zeros((len(spans), T), dtype)
    for b, (lo, hi) in enumerate(spans):
        m[b, lo:hi] = 1
    return m


def ref_gae(rewards, values, mask, gamma, lam):
    """Textbook form: A_t = sum_{k >= t} (gamma lam)^(k-t) delta_k over the span, V = 0 after."""
    B, T = rewards.shape
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        span = [t for t in range(T) if mask[b, t]]
        if not span:
            continue
        end = span[-1]
        delta = {}
        for k in span:
            v_next = float(values[b, k + 1]) if k < end else 0.0
            delta[k] = float(rewards[b, k]) + gamma * v_next - float(values[b, k])
        for t in span:
            adv[b, t] = sum((gamma * lam) ** (k - t) * delta[k] for k in span if k >= t)
            ret[b, t] = adv[b, t] + float(values[b, t])
    return adv, ret


def random_bt(seed, B=5, T=7):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T)).astype(np.float32), rng.standard_normal((B, T)).astype(
        np.float32
    )


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_textbook_reference(mask_dtype, gamma, lam):
    rewards, values = random_bt(0)
    mask = make_mask(mask_dtype)
    rewards[3] = np.nan  # garbage in the empty row must not leak
    adv, ret = losses.gae(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam
    )
    want_adv, want_ret = ref_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ret, want_ret, rtol=RTOL, atol=ATOL)


def test_gae_golden_monte_carlo_returns():
    # gamma = lam = 1: returns are the reward-to-go over the span, whatever the values
    rewards = jnp.array([[0.0, 1.0, 2.0, 3.0, 9.0]])
    values = jnp.array([[5.0, -1.0, 0.5, 2.0, 7.0]])
    mask = jnp.array([[0, 1, 1, 1, 0]])
    adv, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(ret, [[0.0, 6.0, 5.0, 3.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(adv, [[0.0, 7.0, 4.5, 1.0, 0.0]], rtol=1e-6)


def test_gae_jit_and_traced_gamma():
    rewards, values = random_bt(1)
    mask = jnp.asarray(make_mask(np.float32))
    f = lambda g, lam: losses.gae(rewards, values, mask, gamma=g, lam=lam)
    got = jax.jit(f)(jnp.float32(0.9), jnp.float32(0.8))
    want = f(0.9, 0.8)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(mask_dtype, shift_mean):
    x, _ = random_bt(2)
    x = 3.0 * x + 1.5
    mask = make_mask(mask_dtype)
    got = np.asarray(losses.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=shift_mean))
    vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)  # unbiased
    want = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                want[b, t] = (x[b, t] - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    sel = got[mask.astype(bool)] - (0 if shift_mean else mean)
    np.testing.assert_allclose([sel.mean(), sel.std(ddof=1)], [0.0, 1.0], atol=1e-5)


def test_whiten_empty_and_single_mask_finite():
    x = jnp.array([[1.0, 2.0, 3.0]])
    assert np.all(np.asarray(losses.whiten(x, jnp.zeros((1, 3)))) == 0.0)
    single = np.asarray(losses.whiten(x, jnp.array([[0, 1, 0]])))
    assert np.all(np.isfinite(single)) and np.all(single == 0.0)


def ref_policy_loss(logps, old, adv, mask, eps):
    terms, clipped_active, kls = [], [], []
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(float(logps[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            unclipped = -a * ratio
            clipped = -a * min(max(ratio, 1 - eps), 1 + eps)
            terms.append(max(unclipped, clipped))
            clipped_active.append(1.0 if clipped > unclipped else 0.0)
            kls.append(0.5 * (float(logps[b, t]) - float(old[b, t])) ** 2)
    n = max(len(terms), 1)
    return sum(terms) / n, sum(clipped_active) / n, sum(kls) / n


def policy_inputs(seed, B=5, T=7):
    rng = np.random.default_rng(seed)
    old = -rng.uniform(0.5, 3.0, (B, T)).astype(np.float32)
    # log ratios either well inside the clip range or well outside it (no kinks near samples)
    delta = rng.choice([-0.6, -0.1, 0.05, 0.12, 0.5], (B, T)) + rng.uniform(-0.02, 0.02, (B, T))
    logps = (old + delta).astype(np.float32)
    adv = rng.standard_normal((B, T)).astype(np.float32)
    return logps, old, adv


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_ppo_policy_loss_matches_reference(mask_dtype):
    logps, old, adv = policy_inputs(3)
    mask = make_mask(mask_dtype)
    loss, metrics = losses.ppo_policy_loss(
        jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), clip_eps=0.2
    )
    want_loss, want_clipfrac, want_kl = ref_policy_loss(logps, old, adv, mask, 0.2)
    assert loss.shape == () and set(metrics) == {"clipfrac", "approx_kl"}
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["clipfrac"], want_clipfrac, rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], want_kl, rtol=RTOL, atol=ATOL)
    assert 0.0 < float(metrics["clipfrac"]) < 1.0


def test_ppo_policy_loss_golden():
    # token 1: A = 1, ratio e^0.5 = 1.6487: max(-1.6487, -1.2) = -1.2, the clipped term is active.
    # token 2: A = -1, same ratio: max(1.6487, 1.2) = 1.6487, the unclipped term is active.
    logps = jnp.array([[0.5, 0.5]])
    old = jnp.zeros((1, 2))
    adv = jnp.array([[1.0, -1.0]])
    loss, m = losses.ppo_policy_loss(logps, old, adv, jnp.ones((1, 2)), clip_eps=0.2)
    np.testing.assert_allclose(loss, (-1.2 + math.exp(0.5)) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["clipfrac"], 0.5)
    np.testing.assert_allclose(m["approx_kl"], 0.125, rtol=1e-6)
    # on-policy (ratio 1): loss = -mean(A), nothing clipped
    loss, m = losses.ppo_policy_loss(old, old, adv * 3, jnp.ones((1, 2)))
    np.testing.assert_allclose([loss, m["clipfrac"], m["approx_kl"]], [0.0, 0.0, 0.0], atol=1e-7)


def ref_value_loss(values, old, returns, mask, eps):
    terms, active = [], []
    for b in range(values.shape[0]):
        for t in range(values.shape[1]):
            if not mask[b, t]:
                continue
            v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            v_clip = o + min(max(v - o, -eps), eps)
            terms.append(max((v - r) ** 2, (v_clip - r) ** 2))
            active.append(1.0 if (v_clip - r) ** 2 > (v - r) ** 2 else 0.0)
    n = max(len(terms), 1)
    return 0.5 * sum(terms) / n, sum(active) / n


def value_inputs(seed, B=5, T=7):
    rng = np.random.default_rng(seed)
    old = rng.standard_normal((B, T)).astype(np.float32)
    step = rng.choice([-0.6, -0.1, 0.08, 0.5], (B, T)) + rng.uniform(-0.02, 0.02, (B, T))
    values = (old + step).astype(np.float32)
    returns = rng.standard_normal((B, T)).astype(np.float32)
    return values, old, returns


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_ppo_value_loss_matches_reference(mask_dtype):
    values, old, returns = value_inputs(4)
    mask = make_mask(mask_dtype)
    loss, metrics = losses.ppo_value_loss(
        jnp.asarray(values), jnp.asarray(old), jnp.asarray(returns), jnp.asarray(mask), clip_eps=0.2
    )
    want_loss, want_clipfrac = ref_value_loss(values, old, returns, mask, 0.2)
    assert loss.shape == () and set(metrics) == {"clipfrac"}
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["clipfrac"], want_clipfrac, rtol=1e-6)
    assert 0.0 < float(metrics["clipfrac"]) < 1.0


def test_ppo_value_loss_inside_range_never_counts_as_clipped():
    # old + (v - old) != v in floating point; the clipfrac must still be exactly 0 inside the range
    rng = np.random.default_rng(5)
    old = jnp.asarray(rng.standard_normal((3, 50)).astype(np.float32))
    values = old + jnp.asarray(rng.uniform(-0.19, 0.19, (3, 50)).astype(np.float32))
    returns = jnp.asarray(rng.standard_normal((3, 50)).astype(np.float32))
    loss, m = losses.ppo_value_loss(values, old, returns, jnp.ones((3, 50)), clip_eps=0.2)
    assert float(m["clipfrac"]) == 0.0
    np.testing.assert_allclose(loss, 0.5 * jnp.mean((values - returns) ** 2), rtol=1e-6)


def test_ppo_losses_check_grads_and_jit():
    logps, old, adv = (jnp.asarray(a[:2, :4]) for a in policy_inputs(6))
    mask = jnp.asarray(np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32))
    pf = lambda lp, o, a: losses.ppo_policy_loss(lp, o, a, mask, clip_eps=0.2)[0]
    # first order: the surrogate is piecewise linear in the ratio, curvature checks add nothing
    check_grads(
        jax.jit(pf), (logps, old, adv), order=1, modes=["rev"], eps=1e-3, atol=2e-3, rtol=2e-3
    )
    values, vold, returns = (jnp.asarray(a[:2, :4]) for a in value_inputs(7))
    vf = lambda v, o, r: losses.ppo_value_loss(v, o, r, mask, clip_eps=0.2)[0]
    check_grads(
        jax.jit(vf), (values, vold, returns), order=1, modes=["rev"], eps=1e-3, atol=2e-3, rtol=2e-3
    )
    for f, args in [(pf, (logps, old, adv)), (vf, (values, vold, returns))]:
        np.testing.assert_allclose(jax.jit(f)(*args), f(*args), rtol=1e-6, atol=1e-7)
    w = lambda x: losses.whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(jax.jit(w)(adv), w(adv), rtol=1e-6, atol=1e-6)


def test_ppo_grads_finite_and_zero_where_masked():
    logps, old, adv = (np.array(a[:2, :4]) for a in policy_inputs(8))
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
    logps[~mask] = -np.inf  # padding log-probs
    old[~mask] = -np.inf
    adv[~mask] = np.nan

    def total(lp, v):
        pl, _ = losses.ppo_policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), mask)
        vl, _ = losses.ppo_value_loss(v, jnp.asarray(old), jnp.asarray(adv), mask)
        return pl + vl

    val, (g_lp, g_v) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(
        jnp.asarray(logps), jnp.asarray(old)
    )
    assert np.isfinite(val)
    assert np.all(np.isfinite(g_lp)) and np.all(np.isfinite(g_v))
    assert np.all(np.asarray(g_lp)[~mask] == 0.0) and np.all(np.asarray(g_v)[~mask] == 0.0)
    # all-zero mask: loss 0, metrics 0, gradients 0
    loss, m = losses.ppo_policy_loss(logps, old, adv, np.zeros((2, 4)))
    assert float(loss) == 0.0 and float(m["clipfrac"]) == 0.0
