"""rlhf_jax.losses.critic_free against plain-loop float64 references on ragged masks."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

RTOL, ATOL = 1e-5, 1e-6
# full row, ends early, starts late and ends early, single token, empty
SPANS = [(0, 7), (0, 3), (2, 5), (6, 7), (0, 0)]


def _mask(spans=SPANS, t=7, dtype=np.int32):
    m = np.zeros((len(spans), t), dtype)
    for b, (lo, hi) in enumerate(spans):
        m[b, lo:hi] = 1
    return m


# --------------------------------------------------------------------------------------------
# group_advantages


def ref_group_advantages(rewards, baseline, scale, eps):
    out = np.zeros_like(rewards, np.float64)
    for p, row in enumerate(rewards.astype(np.float64)):
        g = len(row)
        for i in range(g):
            others = [row[j] for j in range(g) if j != i]
            base = sum(row) / g if baseline == "mean" else sum(others) / (g - 1)
            out[p, i] = row[i] - base
        if scale == "std":
            mean = sum(row) / g
            std = math.sqrt(sum((x - mean) ** 2 for x in row) / (g - 1))
            out[p] /= std + eps
    return out


@pytest.mark.parametrize("baseline,scale", list(itertools.product(losses.BASELINES, losses.SCALES)))
def test_group_advantages_against_loops(baseline, scale):
    rs = np.random.RandomState(0)
    rewards = rs.randn(5, 4).astype(np.float32)
    rewards[1] = 0.7  # a group that agrees: advantages exactly 0, no division blow-up
    rewards[2] = [1, 0, 0, 1]  # binary (verifiable) rewards
    got = losses.group_advantages(rewards, baseline=baseline, scale=scale, eps=1e-6)
    want = ref_group_advantages(rewards, baseline, scale, 1e-6)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.all(np.asarray(got)[1] == 0.0)


def test_group_advantages_named_methods_and_a_callable():
    r = np.array([[1.0, 0.0, 0.0, 1.0, 1.0]], np.float32)
    grpo = losses.group_advantages(r)  # mean / std
    np.testing.assert_allclose(grpo, (r - 0.6) / (np.std(r, ddof=1) + 1e-6), rtol=1e-6)
    rloo = losses.group_advantages(r, baseline="leave_one_out", scale="none")
    np.testing.assert_allclose(rloo, 5 / 4 * (r - 0.6), rtol=1e-6)
    median = losses.group_advantages(
        r, baseline=lambda x: jnp.median(x, axis=-1, keepdims=True), scale="none"
    )
    np.testing.assert_allclose(median, r - 1.0)
    with pytest.raises(ValueError, match="unknown baseline 'max'; accepted values: mean"):
        losses.group_advantages(r, baseline="max")
    with pytest.raises(ValueError, match="G >= 2"):
        losses.group_advantages(r[:, :1])


# --------------------------------------------------------------------------------------------
# reward_to_go and REINFORCE++


def ref_reward_to_go(rewards, mask, gamma):
    out = np.zeros_like(rewards, np.float64)
    for b in range(rewards.shape[0]):
        span = [t for t in range(rewards.shape[1]) if mask[b, t]]
        for t in span:
            out[b, t] = sum(gamma ** (k - t) * rewards[b, k] for k in span if k >= t)
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_against_loops(gamma):
    rs = np.random.RandomState(1)
    rewards, mask = rs.randn(5, 7).astype(np.float32), _mask()
    got = losses.reward_to_go(rewards, mask, gamma=gamma)
    np.testing.assert_allclose(got, ref_reward_to_go(rewards, mask, gamma), rtol=RTOL, atol=ATOL)


def test_reinforce_pp_advantages_against_loops():
    rs = np.random.RandomState(2)
    mask = _mask()
    scores = rs.randn(5).astype(np.float32)
    logps, ref = (rs.randn(5, 7).astype(np.float32) - 2 for _ in range(2))
    kl_coef = 0.3
    rewards = np.zeros((5, 7))
    for b, (lo, hi) in enumerate(SPANS):
        for t in range(lo, hi):
            rewards[b, t] = -kl_coef * (logps[b, t] - ref[b, t])  # k1
        if hi > lo:
            rewards[b, hi - 1] += scores[b]
    returns = ref_reward_to_go(rewards, mask, 1.0)
    values = returns[mask > 0]
    mean, std = values.mean(), values.std(ddof=1)  # whitened over the whole batch
    want = np.where(mask > 0, (returns - mean) / np.sqrt(std**2 + 1e-8), 0.0)
    got = losses.reinforce_pp_advantages(scores, logps, ref, mask, kl_coef=kl_coef)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# policy_gradient_loss


def ref_pg_loss(logps, old, adv, mask, low, high, ratio, aggregation, max_tokens, ref, kl_coef):
    """Loops in float64: per-token clipped term (+ kl_coef * k3), aggregated."""
    b_, t_ = logps.shape
    adv = np.broadcast_to(adv[:, None], (b_, t_)) if adv.ndim == 1 else adv
    terms = np.zeros((b_, t_))
    counts = {"low": 0, "high": 0}
    for b in range(b_):
        span = [t for t in range(t_) if mask[b, t]]
        if ratio == "sequence" and span:
            seq = math.exp(sum(logps[b, t] - old[b, t] for t in span) / len(span))
        for t in span:
            rho = seq if ratio == "sequence" else math.exp(logps[b, t] - old[b, t])
            a = float(adv[b, t])
            terms[b, t] = max(-a * rho, -a * min(max(rho, 1 - low), 1 + high))
            counts["low"] += a < 0 and rho < 1 - low
            counts["high"] += a > 0 and rho > 1 + high
            if ref is not None:
                log_r = ref[b, t] - logps[b, t]
                terms[b, t] += kl_coef * (math.exp(log_r) - 1 - log_r)
    n = mask.sum()
    rows = [b for b in range(b_) if mask[b].sum() > 0]  # an empty row (a dropped group) weighs 0
    if aggregation == "token_mean":
        loss = terms.sum() / max(n, 1)
    elif aggregation == "sequence_mean":
        loss = np.mean([terms[b].sum() / mask[b].sum() for b in rows])
    else:
        loss = terms.sum() / (len(rows) * (t_ if max_tokens is None else max_tokens))
    return loss, counts["low"] / n, counts["high"] / n


CASES = [
    # ratio, aggregation, low, high, sequence-level advantages, max_tokens, KL in the loss
    ("token", "sequence_mean", 0.2, None, True, None, True),  # GRPO
    ("token", "sequence_sum_norm", 0.2, None, True, 16, False),  # Dr. GRPO
    ("token", "token_mean", 0.2, 0.45, False, None, False),  # DAPO (clip-higher)
    ("sequence", "sequence_mean", 0.05, None, True, None, False),  # GSPO
    ("token", "token_mean", 0.2, None, False, None, True),  # token advantages (REINFORCE++)
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_policy_gradient_loss_against_loops(case):
    ratio, aggregation, low, high, seq_adv, max_tokens, with_kl = case
    rs = np.random.RandomState(3)
    mask = _mask()
    old = (rs.randn(5, 7) - 2).astype(np.float32)
    logps = (old + 0.4 * rs.randn(5, 7)).astype(np.float32)  # ratios on both sides of the clip
    logps[mask == 0] = -np.inf  # padding never leaks (no NaN in values or gradients)
    adv = (rs.randn(5) if seq_adv else rs.randn(5, 7)).astype(np.float32)
    ref = (old + 0.3 * rs.randn(5, 7)).astype(np.float32) if with_kl else None
    kw = dict(
        clip_eps_low=low, clip_eps_high=high, ratio=ratio, aggregation=aggregation,
        max_tokens=max_tokens, kl_coef=0.1, ref_logps=ref,
    )  # fmt: skip
    loss, metrics = losses.policy_gradient_loss(logps, old, adv, mask, **kw)
    want, frac_low, frac_high = ref_pg_loss(
        np.where(mask > 0, logps, 0.0), old, adv, mask, low, low if high is None else high,
        ratio, aggregation, max_tokens, ref, 0.1,
    )  # fmt: skip
    np.testing.assert_allclose(loss, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["clipfrac_low"], frac_low, atol=1e-7)
    np.testing.assert_allclose(metrics["clipfrac_high"], frac_high, atol=1e-7)
    assert 0 < frac_low + frac_high < 1  # the case really clips, and not everywhere
    if (
        high is not None
    ):  # clip-higher matters here: some A > 0 tokens have 1 + low < rho <= 1 + high
        rho = np.exp(np.where(mask > 0, logps, 0.0) - old)
        a = np.broadcast_to(adv[:, None], rho.shape) if adv.ndim == 1 else adv
        assert np.any((mask > 0) & (a > 0) & (rho > 1 + low) & (rho <= 1 + high))
    grads = jax.grad(
        lambda lp: losses.policy_gradient_loss(lp, old, adv, mask, **kw)[0]
    )(jnp.asarray(logps))  # fmt: skip
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[mask == 0] == 0)


def test_policy_gradient_loss_gradient_is_the_clipped_policy_gradient():
    """Token ratio, token mean: d loss / d logp_t = -A_t rho_t / n where the clip is inactive, 0
    where it is active (PPO's gradient); at rho = 1 that is -A_t / n, REINFORCE's."""
    rs = np.random.RandomState(4)
    mask = _mask()
    old = (rs.randn(5, 7) - 2).astype(np.float32)
    logps = (old + 0.4 * rs.randn(5, 7)).astype(np.float32)
    adv = rs.randn(5, 7).astype(np.float32)
    grads = np.asarray(
        jax.grad(lambda lp: losses.policy_gradient_loss(lp, old, adv, mask)[0])(logps)
    )
    n = mask.sum()
    rho = np.exp(logps.astype(np.float64) - old)
    active = ((adv < 0) & (rho < 0.8)) | ((adv > 0) & (rho > 1.2))
    want = np.where((mask > 0) & ~active, -adv * rho / n, 0.0)
    np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-7)
    at_one = jax.grad(
        lambda lp: losses.policy_gradient_loss(lp, jax.lax.stop_gradient(lp), adv, mask)[0]
    )(logps)
    np.testing.assert_allclose(at_one, np.where(mask > 0, -adv / n, 0.0), rtol=1e-6, atol=1e-8)


def test_policy_gradient_loss_metrics_and_errors():
    rs = np.random.RandomState(5)
    mask = _mask()
    old = (rs.randn(5, 7) - 2).astype(np.float32)
    logits = rs.randn(5, 7, 11).astype(np.float32)
    _, metrics = losses.policy_gradient_loss(old, old, np.ones(5), mask, logits=logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(metrics["entropy"], ent[mask > 0].mean(), rtol=1e-5)
    assert float(metrics["approx_kl"]) == 0.0 and float(metrics["ratio_mean"]) == 1.0
    assert float(metrics["kl"]) == 0.0
    with pytest.raises(ValueError, match="unknown aggregation 'mean'; accepted values"):
        losses.policy_gradient_loss(old, old, np.ones(5), mask, aggregation="mean")
    with pytest.raises(ValueError, match="unknown ratio 'seq'"):
        losses.policy_gradient_loss(old, old, np.ones(5), mask, ratio="seq")


# --------------------------------------------------------------------------------------------
# DAPO: overlong penalty and dynamic sampling


def test_overlong_penalty_against_the_piecewise_formula():
    l_max, l_cache = 20, 4
    lengths = np.arange(0, 26)
    want = []
    for n in lengths:  # DAPO Eq. 13
        if n <= l_max - l_cache:
            want.append(0.0)
        elif n <= l_max:
            want.append((l_max - l_cache - n) / l_cache)
        else:
            want.append(-1.0)
    got = losses.overlong_penalty(lengths, max_length=l_max, cache_length=l_cache)
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert float(got[l_max]) == -1.0 and float(got[l_max - l_cache]) == 0.0
    with pytest.raises(ValueError, match="cache_length <= max_length"):
        losses.overlong_penalty(lengths, max_length=4, cache_length=5)


@pytest.mark.parametrize("num_groups", [1, 3, 6])
def test_select_groups_keeps_the_first_informative_groups_in_order(num_groups):
    rewards = np.array(
        [[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 0.25], [2, 2, 2], [1, 0, 1]], np.float32
    )
    informative = [p for p, row in enumerate(rewards) if len(set(row.tolist())) > 1]  # 1, 3, 5
    rest = [p for p in range(len(rewards)) if p not in informative]
    want = (informative + rest)[:num_groups]
    idx, valid = losses.select_groups(rewards, num_groups)
    assert np.asarray(idx).tolist() == want
    assert np.asarray(valid).tolist() == [p in informative for p in want]
    with pytest.raises(ValueError, match="num_groups <= P=6"):
        losses.select_groups(rewards, 7)
