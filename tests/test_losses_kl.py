"""Tests for rlhf_jax.losses.kl against plain-loop float64 references and Monte Carlo."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

RTOL, ATOL = 1e-5, 1e-6
MASK_DTYPES = [np.bool_, np.int32, np.float32]


def ref_kl_estimate(logps, ref_logps, estimator):
    out = np.zeros(logps.shape)
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            log_r = float(ref_logps[b, t]) - float(logps[b, t])
            if estimator == "k1":
                out[b, t] = -log_r
            elif estimator == "k2":
                out[b, t] = 0.5 * log_r**2
            else:
                out[b, t] = math.exp(log_r) - 1.0 - log_r
    return out


def random_logps(seed, B=4, T=6):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 4.0, (B, T)).astype(np.float32)
    ref = (logps + 0.5 * rng.standard_normal((B, T))).astype(np.float32)
    return logps, np.minimum(ref, -1e-3).astype(np.float32)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimate_matches_reference(estimator):
    logps, ref = random_logps(0)
    got = losses.kl_estimate(jnp.asarray(logps), jnp.asarray(ref), estimator=estimator)
    want = ref_kl_estimate(logps, ref, estimator)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    if estimator != "k1":
        assert np.all(np.asarray(got) >= 0)


def test_kl_estimators_unbiasedness_by_monte_carlo():
    # On a small categorical, E_{y~p}[k1] = E_{y~p}[k3] = KL(p||q) exactly; k2 is biased.
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(5))
    q = rng.dirichlet(np.ones(5))
    kl = float(np.sum(p * (np.log(p) - np.log(q))))
    n = 100_000
    y = rng.choice(5, size=n, p=p)
    logps = jnp.asarray(np.log(p)[y][None, :], jnp.float32)
    ref = jnp.asarray(np.log(q)[y][None, :], jnp.float32)
    for est in ["k1", "k3"]:
        samples = np.asarray(losses.kl_estimate(logps, ref, estimator=est), np.float64)
        stderr = samples.std() / math.sqrt(n)
        assert abs(samples.mean() - kl) < 5 * stderr + 1e-4, (est, samples.mean(), kl, stderr)
    # exact expectations over the categorical (no sampling noise) for all three
    logr = np.log(q) - np.log(p)
    all_y = jnp.arange(5)
    for est, expect in [("k1", kl), ("k3", kl), ("k2", float(np.sum(p * 0.5 * logr**2)))]:
        vals = losses.kl_estimate(
            jnp.asarray(np.log(p)[all_y][None], jnp.float32),
            jnp.asarray(np.log(q)[all_y][None], jnp.float32),
            estimator=est,
        )
        np.testing.assert_allclose(float(np.sum(p * np.asarray(vals[0]))), expect, rtol=1e-5)


def ref_exact_kl(logits, ref_logits):
    B, T, V = logits.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            lp = logits[b, t].astype(np.float64)
            lq = ref_logits[b, t].astype(np.float64)
            p = np.exp(lp - lp.max())
            p /= p.sum()
            q = np.exp(lq - lq.max())
            q /= q.sum()
            out[b, t] = sum(p[v] * math.log(p[v] / q[v]) for v in range(V) if p[v] > 0)
    return out


def test_exact_kl_matches_reference_and_golden():
    rng = np.random.default_rng(2)
    logits = (2 * rng.standard_normal((2, 3, 6))).astype(np.float32)
    ref_logits = (2 * rng.standard_normal((2, 3, 6))).astype(np.float32)
    got = losses.exact_kl(jnp.asarray(logits), jnp.asarray(ref_logits))
    np.testing.assert_allclose(got, ref_exact_kl(logits, ref_logits), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        losses.exact_kl(jnp.asarray(logits), jnp.asarray(logits)), 0.0, atol=1e-6
    )
    # golden: p = (1, 0) via -inf, q uniform -> KL = log 2; gradients stay finite
    lg = jnp.array([[[0.0, -jnp.inf]]])
    ref_lg = jnp.zeros((1, 1, 2))
    np.testing.assert_allclose(losses.exact_kl(lg, ref_lg), [[math.log(2.0)]], rtol=1e-6)
    g = jax.jit(jax.grad(lambda x: losses.exact_kl(x, ref_lg).sum()))(lg)
    assert np.all(np.isfinite(g))


def ref_kl_penalized_rewards(scores, logps, ref, mask, kl_coef, estimator):
    B, T = logps.shape
    kl = ref_kl_estimate(logps, ref, estimator)
    out = np.zeros((B, T))
    for b in range(B):
        last = None
        for t in range(T):
            if mask[b, t]:
                out[b, t] = -kl_coef * kl[b, t]
                last = t
        if last is not None:
            out[b, last] += float(scores[b])
    return out


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalized_rewards_matches_reference(mask_dtype, estimator):
    logps, ref = random_logps(3, B=5, T=6)
    scores = np.array([1.0, -2.0, 0.5, 3.0, 7.0], np.float32)
    mask = np.zeros((5, 6), mask_dtype)
    for b, (lo, hi) in enumerate([(0, 6), (0, 2), (2, 5), (0, 0), (5, 6)]):
        mask[b, lo:hi] = 1  # full, ends early, starts late, empty, single last token
    logps[3] = -np.inf  # padding garbage in the empty row must not leak
    got = losses.kl_penalized_rewards(
        jnp.asarray(scores),
        jnp.asarray(logps),
        jnp.asarray(ref),
        jnp.asarray(mask),
        kl_coef=0.1,
        estimator=estimator,
    )
    want = ref_kl_penalized_rewards(scores, logps, ref, mask, 0.1, estimator)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.all(np.asarray(got)[3] == 0.0)


def test_kl_penalized_rewards_traced_coef_and_jit():
    logps, ref = random_logps(4)
    scores = jnp.arange(4, dtype=jnp.float32)
    mask = jnp.asarray(np.tril(np.ones((4, 6)), 2))

    def f(coef):
        return losses.kl_penalized_rewards(scores, logps, ref, mask, kl_coef=coef, estimator="k3")

    coefs = jnp.array([0.0, 0.05, 0.2])
    got = jax.jit(jax.vmap(f))(coefs)
    for i, c in enumerate([0.0, 0.05, 0.2]):
        np.testing.assert_allclose(got[i], f(c), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            got[i],
            ref_kl_penalized_rewards(np.asarray(scores), logps, ref, np.asarray(mask), c, "k3"),
            rtol=RTOL,
            atol=ATOL,
        )
    for fn in [
        lambda a, b: losses.kl_estimate(a, b, estimator="k2"),
        lambda a, b: losses.exact_kl(a[..., None] * jnp.arange(3.0), b[..., None] * jnp.ones(3)),
    ]:
        np.testing.assert_allclose(jax.jit(fn)(logps, ref), fn(logps, ref), rtol=1e-6, atol=1e-6)


def test_invalid_estimator():
    logps, ref = random_logps(5, B=1, T=2)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        losses.kl_estimate(logps, ref, estimator="k4")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        losses.kl_penalized_rewards(
            jnp.zeros(1), logps, ref, jnp.ones((1, 2)), kl_coef=0.1, estimator="exact"
        )


def ref_adaptive(coef, kl, n, target, horizon):
    e = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + e * n / horizon)


@pytest.mark.parametrize("kl", [0.0, 5.0, 6.0, 7.0, 100.0])
def test_adaptive_kl_coef(kl):
    got = losses.adaptive_kl_coef(0.2, kl, 256, target=6.0, horizon=10_000)
    np.testing.assert_allclose(got, ref_adaptive(0.2, kl, 256, 6.0, 10_000), rtol=1e-6)
    jitted = jax.jit(lambda c, k: losses.adaptive_kl_coef(c, k, 256, target=6.0, horizon=10_000))
    np.testing.assert_allclose(jitted(jnp.float32(0.2), jnp.float32(kl)), got, rtol=1e-6)


def test_adaptive_kl_coef_invalid():
    with pytest.raises(ValueError, match="target"):
        losses.adaptive_kl_coef(0.1, 1.0, 1, target=0.0, horizon=10.0)
    with pytest.raises(ValueError, match="horizon"):
        losses.adaptive_kl_coef(0.1, 1.0, 1, target=1.0, horizon=-1.0)


@pytest.mark.parametrize("vocab_major", [False, True], ids=["head", "tied"])
def test_chunked_logps_and_exact_kl_equal_numpy(vocab_major):
    """Policy and reference log-probs and the exact KL, 3 positions at a time (7 positions: the
    last chunk padded), with a soft-cap and a temperature, against NumPy on whole logits."""
    rng = np.random.default_rng(0)
    b, t, d, v, cap, temp = 2, 7, 5, 11, 2.5, 0.7
    h, rh = rng.normal(size=(2, b, t, d)).astype(np.float32)
    w, rw = rng.normal(size=(2, d, v)).astype(np.float32)
    y = rng.integers(0, v, (b, t))
    lay = (lambda x: x.T) if vocab_major else (lambda x: x)
    got = losses.chunked_logps_and_exact_kl(
        h, lay(w), rh, lay(rw), y, chunk=3, softcap=cap, vocab_major=vocab_major, temperature=temp
    )

    def log_softmax(hidden, weight):
        z = hidden.astype(np.float64) @ weight.astype(np.float64)
        z = cap * np.tanh(z / cap) / temp
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(h, w), log_softmax(rh, rw)
    pick = lambda x: np.take_along_axis(x, y[..., None], -1)[..., 0]  # noqa: E731
    want = (pick(lp), pick(lq), (np.exp(lp) * (lp - lq)).sum(-1))
    for g, w_ in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w_, rtol=1e-5, atol=1e-6)
