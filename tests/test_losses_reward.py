"""Tests for rlhf_jax.losses.reward (Bradley-Terry, seed Eq. 2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax import losses


def ref_bt(c, r, margin):
    margin = np.broadcast_to(np.asarray(margin, np.float64), np.shape(c))
    out = []
    for cb, rb, mb in zip(c, r, margin):
        x = float(cb) - float(rb) - float(mb)
        out.append(math.log1p(math.exp(-x)) if x > -30 else -x)  # -log sigmoid(x)
    return np.array(out)


@pytest.mark.parametrize("margin", [0.0, 0.5, "vector"])
def test_bradley_terry_matches_reference(margin):
    rng = np.random.default_rng(0)
    c, r = rng.standard_normal((2, 8)).astype(np.float32) * 3
    if margin == "vector":
        margin = jnp.asarray(rng.uniform(0, 1, 8).astype(np.float32))
    got = losses.bradley_terry_loss(jnp.asarray(c), jnp.asarray(r), margin=margin)
    np.testing.assert_allclose(got, ref_bt(c, r, np.asarray(margin)), rtol=1e-5, atol=1e-6)


def test_bradley_terry_golden_and_stable():
    c = jnp.array([0.0, 1.0, 200.0, -200.0])
    r = jnp.array([0.0, 0.0, -200.0, 200.0])
    got = losses.bradley_terry_loss(c, r)
    want = [math.log(2.0), math.log1p(math.exp(-1.0)), 0.0, 400.0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.all(
        np.isfinite(jax.jit(jax.grad(lambda x: losses.bradley_terry_loss(x, r).sum()))(c))
    )


def test_bradley_terry_grads_and_jit():
    rng = np.random.default_rng(1)
    c, r = (jnp.asarray(a) for a in rng.standard_normal((2, 5)).astype(np.float32))
    f = lambda c, r: losses.bradley_terry_loss(c, r, margin=0.3)
    check_grads(jax.jit(f), (c, r), order=2, modes=["rev"], eps=1e-3, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(jax.jit(f)(c, r), f(c, r), rtol=1e-6, atol=1e-7)
