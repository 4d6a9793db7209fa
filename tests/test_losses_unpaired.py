"""KTO (Ethayarajh et al. 2024), the generalized JSD of GKD (Agarwal et al. 2024) and CPO's
preference term (Xu et al. 2024) against NumPy written from the papers, against the peers'
formulas (TRL's `KTOTrainer.kto_loss` and `GKDTrainer.generalized_jsd_loss`, restated here in
their shape: chosen and rejected rows in separate arrays, the mixture through logsumexp with
log(beta) / log(1 - beta)), and their gradients by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

RNG = np.random.default_rng(0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# KTO


def _kto_numpy(pol, ref, good, z0, beta, wd, wu):
    """The paper's value function, row by row."""
    out = []
    for p, r, g in zip(pol, ref, good):
        ratio = p - r
        if g:
            out.append(wd * (1.0 - _sigmoid(beta * (ratio - z0))))
        else:
            out.append(wu * (1.0 - _sigmoid(beta * (z0 - ratio))))
    return np.array(out)


def test_kto_loss_is_the_papers_weighted_shortfall():
    pol, ref = RNG.normal(-20, 3, 8), RNG.normal(-20, 3, 8)
    good = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    got, metrics = losses.kto_loss(
        pol, ref, good, 0.3, beta=0.2, desirable_weight=1.3, undesirable_weight=0.7
    )
    want = _kto_numpy(pol, ref, good, 0.3, 0.2, 1.3, 0.7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards"], 0.2 * (pol - ref), rtol=1e-5, atol=1e-5)
    assert float(metrics["kl"]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="beta must be > 0"):
        losses.kto_loss(pol, ref, good, 0.0, beta=0.0)


def test_kto_matches_trls_split_form():
    """TRL's kto_loss: the KL point from the mismatched pairs, mean, clamped at 0, detached;
    chosen losses 1 - sigmoid(beta (chosen_logratios - kl)), rejected 1 - sigmoid(beta (kl -
    rejected_logratios)), concatenated after the weights."""
    pol, ref = RNG.normal(-15, 2, 10), RNG.normal(-15, 2, 10)
    good = RNG.integers(0, 2, 10)
    kl_pol, kl_ref = RNG.normal(-15, 2, 10), RNG.normal(-16, 2, 10)  # mismatched pairs
    beta, wd, wu = 0.1, 1.0, 1.33
    kl = max((kl_pol - kl_ref).mean(), 0.0)
    chosen = 1 - _sigmoid(beta * ((pol - ref)[good == 1] - kl))
    rejected = 1 - _sigmoid(beta * (kl - (pol - ref)[good == 0]))
    trl = np.concatenate([wd * chosen, wu * rejected])
    z0 = losses.kto_reference_point(kl_pol, kl_ref)
    got, _ = losses.kto_loss(
        pol, ref, good, z0, beta=beta, desirable_weight=wd, undesirable_weight=wu
    )
    got = np.asarray(got)
    np.testing.assert_allclose(np.concatenate([got[good == 1], got[good == 0]]), trl, rtol=1e-5)


def test_kto_reference_point_is_clamped_and_carries_no_gradient():
    pol, ref = np.array([-3.0, -5.0, -4.0]), np.array([-4.0, -4.5, -4.0])
    assert float(losses.kto_reference_point(pol, ref)) == pytest.approx(np.mean(pol - ref))
    assert float(losses.kto_reference_point(ref - 1, ref)) == 0.0  # mean -1 -> 0
    g = jax.grad(lambda p: losses.kto_reference_point(p, ref))(jnp.asarray(pol))
    np.testing.assert_array_equal(g, 0.0)
    # Nor does z0 passed into the loss carry one.
    good = np.array([1, 0, 1])
    g = jax.grad(lambda z: jnp.sum(losses.kto_loss(pol, ref, good, z, beta=0.5)[0]))(0.2)
    assert float(g) == 0.0


def test_kto_gradient_by_hand():
    """d/d logp of w_d (1 - s(beta (r - z0))) is -w_d beta s (1 - s); of the undesirable form
    +w_u beta s' (1 - s') with s' = s(beta (z0 - r))."""
    pol, ref = np.array([-2.0, -3.0, -1.5]), np.array([-2.5, -2.0, -1.0])
    good, z0, beta, wd, wu = np.array([1, 0, 0]), 0.1, 0.7, 1.2, 0.8

    def total(p):
        return jnp.sum(
            losses.kto_loss(p, ref, good, z0, beta=beta, desirable_weight=wd,
                            undesirable_weight=wu)[0]
        )  # fmt: skip

    got = jax.grad(total)(jnp.asarray(pol))
    r = pol - ref
    s_d, s_u = _sigmoid(beta * (r - z0)), _sigmoid(beta * (z0 - r))
    want = np.where(good == 1, -wd * beta * s_d * (1 - s_d), wu * beta * s_u * (1 - s_u))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Generalized JSD


def _kl(p_log, q_log):
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_against_numpy_and_trls_mixture(beta, temperature):
    student, teacher = RNG.normal(0, 2, (2, 3, 11)), RNG.normal(0, 2, (2, 3, 11))
    got = losses.generalized_jsd(student, teacher, beta=beta, temperature=temperature)
    s, t = _log_softmax(student / temperature), _log_softmax(teacher / temperature)
    if beta == 0.0:
        want = _kl(t, s)  # forward KL
    elif beta == 1.0:
        want = _kl(s, t)  # reverse KL
    else:  # the definition: M = beta t + (1 - beta) s
        m = np.log(beta * np.exp(t) + (1 - beta) * np.exp(s))
        want = beta * _kl(t, m) + (1 - beta) * _kl(s, m)
        # TRL's form: the mixture by logsumexp of the shifted log-probs.
        trl_m = np.logaddexp(s + np.log(1 - beta), t + np.log(beta))
        np.testing.assert_allclose(trl_m, m, atol=1e-12)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert (np.asarray(got) >= -1e-6).all()


def test_generalized_jsd_gradient_by_hand_and_bad_beta():
    """Forward KL: d KL(t || s) / d student_logits = (softmax(s / T) - softmax(t / T)) / T."""
    student, teacher, T = RNG.normal(0, 1, (1, 2, 7)), RNG.normal(0, 1, (1, 2, 7)), 0.8
    grad = jax.grad(lambda x: jnp.sum(losses.generalized_jsd(x, teacher, beta=0.0, temperature=T)))
    want = (np.exp(_log_softmax(student / T)) - np.exp(_log_softmax(teacher / T))) / T
    np.testing.assert_allclose(grad(jnp.asarray(student)), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        losses.generalized_jsd(student, teacher, beta=1.5)


# ---------------------------------------------------------------------------------------------
# CPO's preference term


def test_cpo_loss_is_reference_free_sigmoid_with_label_smoothing():
    c, r = RNG.normal(-30, 5, 6), RNG.normal(-30, 5, 6)
    for eps in (0.0, 0.1):
        got = losses.cpo_loss(c, r, beta=0.1, label_smoothing=eps)
        z = 0.1 * (c - r)
        want = -(1 - eps) * np.log(_sigmoid(z)) - eps * np.log(_sigmoid(-z))
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # DPO's sigmoid loss with a zero reference is the same function.
    dpo, _ = losses.dpo_loss(c, r, np.zeros(6), np.zeros(6), beta=0.1)
    np.testing.assert_allclose(losses.cpo_loss(c, r, beta=0.1), dpo, rtol=1e-6)
