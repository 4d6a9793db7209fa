"""Reward-model step: Bradley-Terry loss, accuracy and margins vs a direct computation from two
separate reward-model forwards; learning on a fixed batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_lm
from helpers.batches import preference_batch as random_pairs

from rlhf_jax.models import RewardModel, init_reward_params
from rlhf_jax.train import create_train_state, make_optimizer, make_reward_step

CFG = tiny_lm.config()  # the conftest's tiny_config, module-level for the helpers below
RM = RewardModel(CFG)


def preference_batch(seed):
    """Right-padded pairs sharing a prompt of 2-3 tokens; responses of random lengths."""
    return random_pairs(seed, 4, 10, CFG.vocab_size)


@pytest.fixture(scope="module")
def setup():
    params = init_reward_params(CFG, jax.random.PRNGKey(0))
    opt = make_optimizer(3e-3)
    traces = []
    step = make_reward_step(RM, opt, margin=0.25)

    def counted(state, batch):
        traces.append(1)
        return step(state, batch)

    return params, opt, jax.jit(counted, donate_argnums=0), traces


def test_reward_step_matches_direct_computation(setup):
    params, opt, step, _ = setup
    batch = preference_batch(0)
    batch["margin"] = np.array([0.0, 0.5, 1.0, -0.5], np.float32)
    fwd = jax.jit(RM.apply)
    r_c = np.asarray(
        fwd({"params": params}, batch["chosen_tokens"], batch["chosen_attention_mask"]), np.float64
    )
    r_r = np.asarray(
        fwd({"params": params}, batch["rejected_tokens"], batch["rejected_attention_mask"]),
        np.float64,
    )
    z = r_c - r_r - 0.25 - batch["margin"]
    want = np.mean(np.log1p(np.exp(-z)))  # -log sigmoid(z)
    state = create_train_state(jax.tree.map(jnp.copy, params), opt, 0)
    state, m = step(state, batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], np.mean(r_c > r_r))
    np.testing.assert_allclose(m["margin"], np.mean(r_c - r_r), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], np.mean(r_c), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], np.mean(r_r), rtol=1e-4, atol=1e-6)
    assert np.isfinite(float(m["grad_norm"])) and float(m["update_norm"]) > 0


def test_reward_model_learns_preferences_without_recompiling(setup):
    params, opt, step, traces = setup
    batch = preference_batch(1)
    batch["margin"] = np.zeros((4,), np.float32)
    state = create_train_state(jax.tree.map(jnp.copy, params), opt, 0)
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert len(traces) == 1 and step._cache_size() == 1
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(m["accuracy"]) == 1.0
