"""Every training step's gradient against an independent one (issue: pin the steps' gradients).

For the SFT, reward-model, DPO-family (sigmoid / cDPO, IPO, hinge, robust, SimPO, ORPO, CPO), KTO
and Unlikelihood / Preferred-FT steps: the loss is written out by hand in this file from its
paper's formula, on log-probs taken from `model.apply` by an explicit log-sum-exp
(tests/helpers/step_reference.py; no `rlhf_jax.losses`), and differentiated with `jax.grad`. One
step of the library with `optax.sgd(lr)` must move every parameter by `-lr ×` that gradient
(≤ 1e-5 relative per parameter leaf), and report the same loss. Batches are ragged (prompts of
2-4 tokens, responses of 1 to T - prompt tokens, chosen and rejected of different lengths) and
the DPO reference differs from the policy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_lm
from helpers.batches import preference_batch
from helpers.step_reference import assert_sgd_step, lm_logps, log_sigmoid, side_logps

from rlhf_jax.models import RewardModel, Transformer, init_reward_params
from rlhf_jax.train import (
    attach_reference_logps,
    create_train_state,
    make_dpo_step,
    make_kto_step,
    make_reward_step,
    make_sft_step,
    make_unlikelihood_step,
)

CFG = tiny_lm.config(n_layers=2)  # the conftest's tiny(n_layers=2), module-level for helpers
MODEL = Transformer(CFG)
B, T = 5, 12
LR = 1.0


def ragged_pairs(seed):
    """Prompts of 2-4 tokens; responses of 1 .. T - prompt tokens, drawn separately for chosen
    and rejected; row 0's rejected response is a single token."""
    return preference_batch(
        seed, B, T, CFG.vocab_size, prompt_lengths=(2, 5), one_token_rejected=True
    )


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def run_step(step, state, batch):
    """One jitted step; returns (old params, new params, metrics)."""
    old = jax.tree.map(np.asarray, state.params)
    new_state, metrics = jax.jit(step)(state, batch)
    return old, new_state.params, metrics


@pytest.fixture(scope="module")
def policy(tiny):
    return tiny(n_layers=2).params


@pytest.fixture(scope="module")
def reference(tiny, policy):
    """A reference that differs from the policy: another init, averaged with it."""
    other = tiny(seed=1, n_layers=2).params
    return jax.tree.map(lambda a, b: 0.5 * (a + b), policy, other)


# ------------------------------------------------------------------------------------------------
# SFT: masked next-token NLL.


@pytest.mark.parametrize("reduction", ["token", "example"])
def test_sft_step_gradient(policy, reduction):
    pairs = ragged_pairs(0)
    batch = {k: pairs[f"chosen_{k}"] for k in ("tokens", "attention_mask", "loss_mask")}

    def loss(params):
        tlp, m = lm_logps(
            MODEL, params, batch["tokens"], batch["attention_mask"], batch["loss_mask"]
        )
        if reduction == "token":  # every response token weighs the same
            return -jnp.sum(tlp * m) / jnp.sum(m)
        return jnp.mean(-jnp.sum(tlp * m, axis=1) / jnp.sum(m, axis=1))  # every example

    want, grads = jax.value_and_grad(loss)(policy)
    opt = optax.sgd(LR)
    step = make_sft_step(MODEL, opt, reduction=reduction)
    old, new, m = run_step(step, create_train_state(copy(policy), opt, 0), batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    assert_sgd_step(old, new, grads, LR)


# ------------------------------------------------------------------------------------------------
# Reward model: Bradley-Terry with a per-pair margin (seed Eq. 2; Touvron et al. 2023 Eq. 2).


def test_reward_step_gradient():
    rm = RewardModel(CFG)
    params = init_reward_params(CFG, jax.random.PRNGKey(2))
    batch = ragged_pairs(1)
    batch["margin"] = np.array([0.0, 0.5, 1.0, -0.5, 2.0], np.float32)

    def loss(p):
        r_c = rm.apply({"params": p}, batch["chosen_tokens"], batch["chosen_attention_mask"])
        r_r = rm.apply({"params": p}, batch["rejected_tokens"], batch["rejected_attention_mask"])
        return jnp.mean(-log_sigmoid(r_c - r_r - 0.25 - batch["margin"]))

    want, grads = jax.value_and_grad(loss)(params)
    opt = optax.sgd(LR)
    step = make_reward_step(rm, opt, margin=0.25)
    old, new, m = run_step(step, create_train_state(copy(params), opt, 0), batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    assert_sgd_step(old, new, grads, LR)


# ------------------------------------------------------------------------------------------------
# The DPO family.


def log_odds(avg_logp):
    """log(p / (1 - p)) from the mean token log-prob log p (< 0)."""
    return avg_logp - jnp.log(-jnp.expm1(avg_logp))


def dpo_family_loss(loss_type, hp, eps, pc, pr, rc, rr, nll):
    """The per-pair losses of each method on sequence log-probs (sums, or means where the method
    uses length-averaged ones), written out from the papers."""
    beta = hp["beta"]
    h = (pc - rc) - (pr - rr)  # implicit reward margin / beta
    if loss_type == "sigmoid":  # Rafailov et al. 2023 Eq. 7; eps > 0: cDPO (Mitchell 2023)
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "ipo":  # Azar et al. 2023 Eq. 17
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":  # SLiC (Zhao et al. 2023)
        return jnp.maximum(0.0, 1 - beta * h)
    if loss_type == "robust":  # Chowdhury et al. 2024 Eq. 7
        return ((1 - eps) * -log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "simpo":  # Meng et al. 2024 Eq. 6, on length-averaged log-probs
        return -log_sigmoid(beta * (pc - pr) - hp["gamma"])
    if loss_type == "cpo":  # Xu et al. 2024 Eq. 3 + 4: reference-free sigmoid + NLL(y_w)
        z = beta * (pc - pr)
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z) + nll
    assert loss_type == "orpo"  # Hong et al. 2024 Eq. 6: NLL + lambda * L_OR
    return nll - beta * log_sigmoid(log_odds(pc) - log_odds(pr))


# (loss_type, hparams, label_smoothing, average_log_prob)
DPO_CASES = [
    ("sigmoid", {"beta": 0.5}, 0.0, False),
    ("sigmoid", {"beta": 0.3}, 0.2, False),  # cDPO
    ("sigmoid", {"beta": 2.0}, 0.0, True),
    ("ipo", {"beta": 0.4}, 0.0, True),
    ("hinge", {"beta": 3.3}, 0.0, False),  # rows on both sides of the hinge
    ("robust", {"beta": 0.5}, 0.25, False),
    ("simpo", {"beta": 2.0, "gamma": 0.3}, 0.0, True),
    ("orpo", {"beta": 0.7}, 0.0, True),
    ("cpo", {"beta": 0.4}, 0.1, False),  # sequence sums, label smoothing, cpo_alpha 1
]


@pytest.mark.parametrize(
    "loss_type,hp,eps,average", DPO_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DPO_CASES)]
)
def test_dpo_family_step_gradient(policy, reference, loss_type, hp, eps, average):
    batch = ragged_pairs(2)
    uses_reference = loss_type not in ("simpo", "orpo", "cpo")
    rc = rr = 0.0
    if uses_reference:
        rc = side_logps(MODEL, reference, batch, "chosen", average=average)[0]
        rr = side_logps(MODEL, reference, batch, "rejected", average=average)[0]

    def loss(params):
        pc, tlp_c, m_c = side_logps(MODEL, params, batch, "chosen", average=average)
        pr = side_logps(MODEL, params, batch, "rejected", average=average)[0]
        nll = -jnp.sum(tlp_c * m_c) / jnp.sum(m_c)  # ORPO's token-weighted NLL of y_w
        return jnp.mean(dpo_family_loss(loss_type, hp, eps, pc, pr, rc, rr, nll))

    want, grads = jax.value_and_grad(loss)(policy)
    if loss_type == "hinge":  # both sides of the hinge occur in the batch
        pc, pr = (side_logps(MODEL, policy, batch, s)[0] for s in ("chosen", "rejected"))
        active = 1 - hp["beta"] * ((pc - rc) - (pr - rr)) > 0
        assert 0 < int(active.sum()) < B, active
    opt = optax.sgd(LR)
    step = make_dpo_step(
        MODEL, opt, loss_type=loss_type, label_smoothing=eps, average_log_prob=average
    )
    frozen = copy(reference) if uses_reference else None
    state = create_train_state(copy(policy), opt, 0, frozen=frozen, hparams=hp)
    old, new, m = run_step(step, state, batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    assert_sgd_step(old, new, grads, LR)


def test_dpo_step_gradient_with_precomputed_reference(policy, reference):
    """Reference log-probs carried by the batch give the same gradient as the frozen reference,
    and the step does not differentiate through them."""
    batch = ragged_pairs(3)
    rc = side_logps(MODEL, reference, batch, "chosen")[0]
    rr = side_logps(MODEL, reference, batch, "rejected")[0]
    beta = 0.5

    def loss(params):
        pc = side_logps(MODEL, params, batch, "chosen")[0]
        pr = side_logps(MODEL, params, batch, "rejected")[0]
        return jnp.mean(-log_sigmoid(beta * ((pc - rc) - (pr - rr))))

    want, grads = jax.value_and_grad(loss)(policy)
    opt = optax.sgd(LR)
    cached = attach_reference_logps(batch, np.asarray(rc), np.asarray(rr))
    state = create_train_state(copy(policy), opt, 0, hparams={"beta": beta})
    old, new, m = run_step(make_dpo_step(MODEL, opt), state, cached)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    assert_sgd_step(old, new, grads, LR)


# ------------------------------------------------------------------------------------------------
# KTO (Ethayarajh et al. 2024): unpaired rows and the mismatched pairs of the reference point.


def unpaired_batch(seed):
    """The chosen side of ragged pairs as the rows (labels 1, 0, 1, 0, 1) and the rejected side
    as their mismatched prompt-completion pairs."""
    pairs = ragged_pairs(seed)
    batch = {"desirable": np.array([1, 0, 1, 0, 1], np.int32)}
    for name in ("tokens", "attention_mask", "loss_mask"):
        batch[name] = pairs[f"chosen_{name}"]
        batch[f"kl_{name}"] = pairs[f"rejected_{name}"]
    return pairs, batch


@pytest.mark.parametrize("precomputed", [False, True])
def test_kto_step_gradient(policy, reference, precomputed):
    """w_d (1 - s(beta (r - z0))) / w_u (1 - s(beta (z0 - r))) with z0 = max(0, mean over the
    mismatched pairs of policy - reference log-probs), z0 held constant."""
    pairs, batch = unpaired_batch(3)
    beta, wd, wu = 0.8, 1.0, 1.5
    ref = side_logps(MODEL, reference, pairs, "chosen")[0]
    ref_kl = side_logps(MODEL, reference, pairs, "rejected")[0]
    pol_kl = side_logps(MODEL, policy, pairs, "rejected")[0]
    z0 = jnp.maximum(jnp.mean(pol_kl - ref_kl), 0.0)
    assert float(z0) > 0  # the case exercises the reference point
    good = batch["desirable"] > 0

    def loss(params):
        r = side_logps(MODEL, params, pairs, "chosen")[0] - ref
        per = jnp.where(good, wd * (1 - jax.nn.sigmoid(beta * (r - z0))),
                        wu * (1 - jax.nn.sigmoid(beta * (z0 - r))))  # fmt: skip
        return jnp.mean(per)

    want, grads = jax.value_and_grad(loss)(policy)
    opt = optax.sgd(LR)
    step = make_kto_step(MODEL, opt, desirable_weight=wd, undesirable_weight=wu)
    frozen = None
    if precomputed:
        batch = {
            **batch,
            "reference_logps": np.asarray(ref),
            "reference_kl_logps": np.asarray(ref_kl),
        }
    else:
        frozen = copy(reference)
    state = create_train_state(copy(policy), opt, 0, frozen=frozen, hparams={"beta": beta})
    old, new, m = run_step(step, state, batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], z0, rtol=1e-5)
    assert_sgd_step(old, new, grads, LR)


# ------------------------------------------------------------------------------------------------
# Unlikelihood (Welleck et al. 2019) and Preferred-FT (alpha = 0), the frontier's baselines.


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_unlikelihood_step_gradient(policy, alpha):
    batch = ragged_pairs(4)

    def loss(params):
        _, tlp_c, m_c = side_logps(MODEL, params, batch, "chosen")
        _, tlp_r, m_r = side_logps(MODEL, params, batch, "rejected")
        nll = -jnp.sum(tlp_c * m_c, axis=1) / jnp.sum(m_c, axis=1)  # [B] per-example mean
        log_1mp = jnp.log(-jnp.expm1(jnp.where(m_r > 0, tlp_r, -1.0)))  # log(1 - p) on y_l
        unlikely = -jnp.sum(log_1mp * m_r, axis=1) / jnp.sum(m_r, axis=1)  # [B]
        return jnp.mean(nll + alpha * unlikely)

    want, grads = jax.value_and_grad(loss)(policy)
    opt = optax.sgd(LR)
    state = create_train_state(copy(policy), opt, 0, hparams={"alpha": alpha})
    old, new, m = run_step(make_unlikelihood_step(MODEL, opt), state, batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    assert_sgd_step(old, new, grads, LR)
