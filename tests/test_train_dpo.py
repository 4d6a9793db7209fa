"""DPO-family step: loss vs the cDPO / SimPO / ORPO formulas in NumPy on log-probs from a plain
per-row loop, precomputed reference == frozen reference, vmap over beta == separate steps, no
recompilation, reference log-probs stored with the data. (Gradients: test_step_gradients.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_lm
from helpers.batches import preference_batch as random_pairs

from rlhf_jax.models import Transformer
from rlhf_jax.train import (
    attach_reference_logps,
    attach_reference_to_records,
    compute_reference_logps,
    create_train_state,
    load_reference_logps,
    make_dpo_step,
    save_reference_logps,
    stack_states,
    unstack_state,
)

CFG = tiny_lm.config()  # the conftest's tiny_config, module-level for the helpers below
MODEL = Transformer(CFG)
B, T = 4, 10


def preference_batch(seed):
    """Right-padded pairs sharing a prompt of 2-3 tokens; responses of random lengths."""
    return random_pairs(seed, B, T, CFG.vocab_size)


_FWD_ROW = jax.jit(lambda p, tok, mask: MODEL.apply({"params": p}, tok, attention_mask=mask))


def loop_logps(params, batch, side, average=False):
    """Plain loop over rows: one [1, T] forward each, sum of log-softmax at targets where the
    (shifted) loss mask is 1."""
    out = []
    for i in range(batch[f"{side}_tokens"].shape[0]):
        tok = batch[f"{side}_tokens"][i : i + 1]
        logits = np.asarray(_FWD_ROW(params, tok, batch[f"{side}_attention_mask"][i : i + 1]))[0]
        logits = logits.astype(np.float64)
        total, count = 0.0, 0
        for t in range(tok.shape[1] - 1):
            if batch[f"{side}_loss_mask"][i, t + 1]:
                z = logits[t]
                logz = np.log(np.sum(np.exp(z - z.max()))) + z.max()
                total += z[tok[0, t + 1]] - logz
                count += 1
        out.append(total / max(count, 1) if average else total)
    return np.asarray(out, np.float32)


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def counted_jit(step, traces):
    def counted(state, batch):
        traces.append(1)
        return step(state, batch)

    return jax.jit(counted, donate_argnums=0)


@pytest.fixture(scope="module")
def setup(tiny, tiny_params):
    policy, ref = tiny_params, tiny(seed=1).params
    # Plain SGD: params after a step are linear in the gradient, so comparisons of params are
    # well-conditioned (Adam's first step, g / (|g| + eps), amplifies rounding where g ~ eps).
    opt = optax.sgd(0.5)
    traces = []
    raw = make_dpo_step(MODEL, opt, label_smoothing=0.1)
    return policy, ref, opt, counted_jit(raw, traces), traces, raw


def state_for(setup, beta, frozen=True):
    policy, ref, opt, *_ = setup
    return create_train_state(
        copy(policy), opt, 0, frozen=copy(ref) if frozen else None, hparams={"beta": beta}
    )


def test_dpo_step_matches_loss_on_loop_logps(setup):
    policy, ref, _, step, *_ = setup
    batch = preference_batch(0)
    pc, pr = loop_logps(policy, batch, "chosen"), loop_logps(policy, batch, "rejected")
    rc, rr = loop_logps(ref, batch, "chosen"), loop_logps(ref, batch, "rejected")
    # cDPO (Mitchell 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), in NumPy.
    z = 0.1 * ((pc - rc) - (pr - rr)).astype(np.float64)
    want = 0.9 * np.logaddexp(0.0, -z) + 0.1 * np.logaddexp(0.0, z)
    state, m = step(state_for(setup, 0.1), batch)
    np.testing.assert_allclose(m["loss"], np.mean(want), rtol=1e-5)
    np.testing.assert_allclose(m["logps/chosen"], pc.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["logps/rejected"], pr.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/chosen"], 0.1 * (pc - rc).mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], 0.1 * (pr - rr).mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        m["rewards/margin"], 0.1 * ((pc - rc) - (pr - rr)).mean(), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(m["rewards/accuracy"], np.mean((pc - rc) > (pr - rr)))
    assert np.isfinite(float(m["grad_norm"])) and float(m["update_norm"]) > 0
    # The frozen reference is untouched by the update.
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)


def test_precomputed_reference_equals_frozen_reference(setup, tmp_path):
    policy, ref, opt, step, *_ = setup
    batches = [preference_batch(10), preference_batch(11)]
    chosen, rejected = compute_reference_logps(MODEL, ref, batches)
    assert chosen.shape == rejected.shape == (2 * B,)
    np.testing.assert_allclose(chosen[B:], loop_logps(ref, batches[1], "chosen"), rtol=1e-5)
    np.testing.assert_allclose(rejected[:B], loop_logps(ref, batches[0], "rejected"), rtol=1e-5)

    # Stored with the data: an .npz beside it, or fields of the records.
    path = str(tmp_path / "ref.npz")
    save_reference_logps(path, chosen, rejected)
    c2, r2 = load_reference_logps(path)
    np.testing.assert_array_equal(c2, chosen)
    recs = attach_reference_to_records([{"id": i} for i in range(2 * B)], c2, r2)
    assert recs[3]["reference_rejected_logps"] == float(r2[3]) and recs[3]["id"] == 3

    # An "index" key places rows by example id.
    shuffled = {**batches[0], "index": np.array([7, 6, 5, 4])}
    c3, _ = compute_reference_logps(MODEL, ref, [shuffled])
    np.testing.assert_allclose(c3[[7, 6, 5, 4]], chosen[:B], rtol=1e-6)

    cached_step = jax.jit(make_dpo_step(MODEL, opt, label_smoothing=0.1), donate_argnums=0)
    s_frozen, s_cached = state_for(setup, 0.1), state_for(setup, 0.1, frozen=False)
    for i, batch in enumerate(batches):
        s_frozen, m_frozen = step(s_frozen, batch)
        batch = attach_reference_logps(batch, chosen[i * B : (i + 1) * B], rejected[i * B :][:B])
        s_cached, m_cached = cached_step(s_cached, batch)
        np.testing.assert_allclose(m_cached["loss"], m_frozen["loss"], rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s_cached.params), jax.tree.leaves(s_frozen.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="reference"):
        cached_step(s_cached, batches[0])  # neither frozen params nor cached log-probs


def test_vmap_over_beta_equals_separate_steps(setup):
    _, _, _, step, _, raw = setup
    betas = [0.05, 0.1, 0.5]
    batch = preference_batch(2)
    sweep = jax.jit(jax.vmap(raw, in_axes=(0, None)), donate_argnums=0)
    stacked, m_sweep = sweep(stack_states([state_for(setup, b) for b in betas]), batch)
    for i, beta in enumerate(betas):
        single, m_single = step(state_for(setup, beta), batch)
        np.testing.assert_allclose(m_sweep["loss"][i], m_single["loss"], rtol=1e-5, atol=1e-6)
        got = unstack_state(stacked, i).params
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(single.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(m_sweep["loss"][0], m_sweep["loss"][2])


def test_dpo_step_compiles_once(setup):
    *_, step, traces, _ = setup
    state = state_for(setup, 0.1)
    state, _ = step(state, preference_batch(19))
    # Relative to this test: jax's executable cache is shared by every jitted function of the
    # worker process and may have evicted this step's entry since the module's earlier tests.
    n, traced = step._cache_size(), len(traces)
    for seed in range(3):
        state, m = step(state, preference_batch(20 + seed))
        assert np.isfinite(float(m["loss"]))
    assert step._cache_size() == n == 1 and len(traces) == traced
    assert int(state.step) == 4


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_variants(setup, loss_type):
    policy, _, opt, *_ = setup
    batch = preference_batch(3)
    pc = loop_logps(policy, batch, "chosen", average=True)
    pr = loop_logps(policy, batch, "rejected", average=True)
    pc64, pr64 = pc.astype(np.float64), pr.astype(np.float64)
    if loss_type == "simpo":  # -log sigmoid(beta (c - r) - gamma), Meng et al. 2024 Eq. 6
        want = np.mean(np.logaddexp(0.0, -(2.0 * (pc64 - pr64) - 0.3)))
        hparams = {"beta": 2.0, "gamma": 0.3}
    else:
        # NLL = token-weighted mean over chosen response tokens = sum of sums / count.
        n_tok = batch["chosen_loss_mask"][:, 1:].sum(1)
        nll = -np.sum(pc64 * n_tok) / n_tok.sum()

        def log_odds(p):  # log(p / (1 - p)) from log p
            return p - np.log1p(-np.exp(p))

        odds = np.mean(np.logaddexp(0.0, -(log_odds(pc64) - log_odds(pr64))))  # Hong et al. Eq. 7
        want = nll + 0.1 * odds
        hparams = {"beta": 0.1}
    state = create_train_state(copy(policy), opt, 0, hparams=hparams)
    _, m = jax.jit(make_dpo_step(MODEL, opt, loss_type=loss_type))(state, batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["logps/chosen"], pc.mean(), rtol=1e-5)
    assert np.isfinite(float(m["grad_norm"]))
