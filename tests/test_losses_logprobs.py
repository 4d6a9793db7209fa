"""Tests for rlhf_jax.losses.logprobs against plain-loop float64 references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

RTOL, ATOL = 1e-5, 1e-5
MASK_DTYPES = [np.bool_, np.int32, np.float32, np.uint8]


def make_mask(rows, T, dtype):
    """rows: list of (start, stop) half-open masked spans; (0, 0) is an empty row."""
    m = np.zeros((len(rows), T), dtype)
    for b, (start, stop) in enumerate(rows):
        m[b, start:stop] = 1
    return m


def ref_token_logps(logits, targets):
    logits = np.asarray(logits, np.float64)
    B, T, V = logits.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            row = logits[b, t]
            mx = max(row)
            lse = mx + math.log(sum(math.exp(x - mx) for x in row))
            out[b, t] = row[targets[b, t]] - lse
    return out


def ref_sequence_logps(tlp, mask, average):
    B, T = tlp.shape
    out = np.zeros(B)
    for b in range(B):
        total, n = 0.0, 0
        for t in range(T):
            if mask[b, t]:
                total += float(tlp[b, t])
                n += 1
        out[b] = total / max(n, 1) if average else total
    return out


def ref_entropy(logits):
    logits = np.asarray(logits, np.float64)
    B, T, V = logits.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            e = np.exp(logits[b, t] - logits[b, t].max())
            p = e / e.sum()
            out[b, t] = -sum(pv * math.log(pv) for pv in p if pv > 0)
    return out


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    B, T, V = 4, 6, 7
    logits = (3.0 * rng.standard_normal((B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    # full row, row ending early, row starting late (prompt) and ending early, empty row
    rows = [(0, T), (0, 3), (2, 5), (0, 0)]
    return logits, targets, rows


def test_token_logps_matches_loop(data):
    logits, targets, _ = data
    got = losses.token_logps(jnp.asarray(logits), jnp.asarray(targets))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_token_logps(logits, targets), rtol=RTOL, atol=ATOL)


def test_token_logps_bf16_logits_computed_in_float32(data):
    logits, targets, _ = data
    lb = jnp.asarray(logits, jnp.bfloat16)
    got = losses.token_logps(lb, jnp.asarray(targets))
    assert got.dtype == jnp.float32
    want = ref_token_logps(np.asarray(lb.astype(jnp.float32)), targets)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_loop(data, mask_dtype, average):
    logits, targets, rows = data
    tlp = ref_token_logps(logits, targets).astype(np.float32)
    mask = make_mask(rows, tlp.shape[1], mask_dtype)
    got = losses.sequence_logps(jnp.asarray(tlp), jnp.asarray(mask), average=average)
    want = ref_sequence_logps(tlp, mask, average)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert got[3] == 0.0  # empty row


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_sft_loss_matches_loop(data, mask_dtype):
    logits, targets, rows = data
    mask = make_mask(rows, targets.shape[1], mask_dtype)
    got = losses.sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    want = -ref_sequence_logps(ref_token_logps(logits, targets), mask, average=True)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert got[3] == 0.0


def test_sft_loss_golden_uniform():
    # uniform logits over V tokens: NLL = log V for every token, whatever the mask length
    V = 5
    logits = jnp.zeros((2, 3, V))
    targets = jnp.array([[0, 1, 2], [3, 4, 0]], jnp.int32)
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(
        losses.sft_loss(logits, targets, mask), [math.log(V), 0.0], rtol=1e-6
    )


def test_entropy_matches_loop(data):
    logits, _, _ = data
    got = losses.entropy_from_logits(jnp.asarray(logits))
    np.testing.assert_allclose(got, ref_entropy(logits), rtol=RTOL, atol=ATOL)


def test_entropy_golden_and_minus_inf():
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -jnp.inf, -jnp.inf]]])
    np.testing.assert_allclose(
        losses.entropy_from_logits(logits), [[math.log(4), math.log(2)]], rtol=1e-6
    )
    grad = jax.jit(jax.grad(lambda x: losses.entropy_from_logits(x).sum()))(logits)
    assert np.all(np.isfinite(grad))


def test_jit_equals_nojit(data):
    logits, targets, rows = data
    mask = jnp.asarray(make_mask(rows, targets.shape[1], np.float32))
    args = (jnp.asarray(logits), jnp.asarray(targets), mask)
    for fn in [
        lambda lg, tg, m: losses.token_logps(lg, tg),
        lambda lg, tg, m: losses.sequence_logps(losses.token_logps(lg, tg), m, average=True),
        losses.sft_loss,
        lambda lg, tg, m: losses.entropy_from_logits(lg),
    ]:
        np.testing.assert_allclose(jax.jit(fn)(*args), fn(*args), rtol=1e-6, atol=1e-6)


def test_sft_grads_finite_with_masked_padding():
    # row 1 has no masked token and its logits are -inf-ish padding; row 0's last position too
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 4, 5)).astype(np.float32)
    logits[1] = np.finfo(np.float32).min
    logits[0, 3, :] = -1e30
    logits[0, 3, 0] = 0.0
    targets = np.array([[1, 2, 3, 4], [0, 0, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], bool)

    def f(x):
        return losses.sft_loss(x, jnp.asarray(targets), jnp.asarray(mask)).sum()

    value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(logits))
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[1] == 0.0) and np.all(grad[0, 3] == 0.0)

    # -inf log-probs at masked-out positions do not leak into sequence_logps or its gradient
    tlp = jnp.array([[-1.0, -jnp.inf], [-jnp.inf, -jnp.inf]])
    m = jnp.array([[1, 0], [0, 0]])
    val, g = jax.jit(jax.value_and_grad(lambda x: losses.sequence_logps(x, m, average=True).sum()))(
        tlp
    )
    assert val == -1.0 and np.all(np.isfinite(g))
