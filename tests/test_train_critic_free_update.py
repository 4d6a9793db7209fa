"""The structure of the critic-free update (`train.make_critic_free_update`): `epochs` passes of
`num_minibatches` SGD steps, each on a contiguous block of whole groups (rows are prompt-major:
row p * G + g is completion g of prompt p), in order, every epoch's ratio against the rollout's
log-probs; metrics the mean over the epochs × minibatches steps.

The reference is written out here: log-probs from the model's logits by an explicit log-sum-exp,
GRPO's clipped loss with its k3 KL aggregated per sequence, `jax.grad` of that, and
`params - lr * grad` by hand, minibatch after minibatch; nothing from `rlhf_jax.losses` or
`rlhf_jax.train` but the rollout under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_lm

from rlhf_jax import train

T, N, EOS, PAD = 0.8, 5, 3, 0
G, PROMPTS_N = 2, 4  # 4 prompts x 2 completions = 8 rows, 4 groups
LR, KL_COEF, EPS = 0.1, 0.05, 0.2
PROMPTS = {  # LEFT-padded, P = 4
    "prompt_tokens": np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13], [0, 0, 0, 14]]),
    "prompt_mask": np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
}
P = PROMPTS["prompt_tokens"].shape[1]


def _config(**kw):
    return train.CriticFreeConfig(
        algo="grpo", group_size=G, max_new_tokens=N, temperature=T, eos_id=EOS, pad_id=PAD, **kw
    )


_jitter = tiny_lm.jitter


@pytest.fixture(scope="module")
def rollout(tiny):
    """(model, policy params, the state, a rollout with advantages of both signs per group)."""
    base = tiny()
    policy = _jitter(base.params, 1, 1.0)
    ref = _jitter(policy, 2, 0.5)
    tx = optax.sgd(LR)
    state = train.create_critic_free_state(policy, tx, 0, ref_params=ref, kl_coef=KL_COEF)
    _, ro = jax.jit(train.make_critic_free(base.model, tx, _config()).rollout)(state, PROMPTS)
    mask = np.asarray(ro.response_mask)
    # Advantages of different sizes in every group (an order or a split of groups shows).
    adv = np.random.default_rng(0).normal(size=(mask.shape[0], 1)) * np.ones((1, N))
    ro = ro.replace(
        advantages=jnp.asarray(np.where(mask > 0, adv, 0.0), jnp.float32),
        stats={"reward": jnp.float32(0.25)},  # what `score` leaves for the update to pass on
    )
    return base.model, policy, state, ro


def _hand_loss(model, params, ro, rows):
    """GRPO's loss on `rows` of the rollout: per token max(-A rho, -A clip(rho, 1 -+ eps)) +
    beta k3(pi, pi_ref), each row's token mean, then the mean over non-empty rows."""
    pick = lambda x: jnp.asarray(x)[rows]  # noqa: E731
    r_tok, r_mask = pick(ro.response_tokens), pick(ro.response_mask) > 0
    tokens = jnp.concatenate([pick(ro.query_tokens), r_tok], 1)
    mask = jnp.concatenate([pick(ro.query_mask), pick(ro.response_mask)], 1)
    logits = model.apply({"params": params}, tokens, attention_mask=mask)[:, P - 1 : P - 1 + N]
    z = logits / T
    top = jnp.max(z, -1, keepdims=True)
    log_z = top[..., 0] + jnp.log(jnp.sum(jnp.exp(z - top), -1))
    logp = jnp.sum(z * jax.nn.one_hot(r_tok, z.shape[-1]), -1) - log_z  # [b, N]
    rho = jnp.exp(jnp.where(r_mask, logp - pick(ro.logps), 0.0))
    adv = pick(ro.advantages)
    pg = jnp.maximum(-adv * rho, -adv * jnp.clip(rho, 1 - EPS, 1 + EPS))
    d = jnp.where(r_mask, pick(ro.ref_logps) - logp, 0.0)
    k3 = jnp.exp(d) - d - 1.0
    per_token = jnp.where(r_mask, pg + KL_COEF * k3, 0.0)
    per_row = jnp.sum(per_token, -1) / jnp.maximum(jnp.sum(r_mask, -1), 1)
    return jnp.sum(per_row) / jnp.maximum(jnp.sum(jnp.any(r_mask, -1)), 1)


def _by_hand(model, params, ro, epochs, minibatches):
    """(params, losses, grad norms) after `epochs` passes over contiguous blocks of b / K rows."""
    grad_fn = jax.jit(jax.value_and_grad(lambda p, rows: _hand_loss(model, p, ro, rows)))
    b = ro.response_tokens.shape[0]
    size = b // minibatches
    losses, norms = [], []
    for _ in range(epochs):
        for j in range(minibatches):
            loss, grads = grad_fn(params, jnp.arange(j * size, (j + 1) * size))
            losses.append(float(loss))
            norms.append(float(optax.tree.norm(grads)))
            params = jax.tree.map(lambda x, g: x - LR * g, params, grads)
    return params, losses, norms


@pytest.mark.parametrize("epochs,minibatches", [(1, 1), (3, 2)])
def test_update_is_sgd_over_contiguous_blocks_of_whole_groups_for_every_epoch(
    rollout, epochs, minibatches
):
    model, policy, state, ro = rollout
    cfg = _config(epochs=epochs, num_minibatches=minibatches)
    update = jax.jit(train.make_critic_free_update(model, optax.sgd(LR), cfg))
    new, metrics = update(jax.tree.map(jnp.copy, state), ro)
    want, losses, norms = _by_hand(model, policy, ro, epochs, minibatches)
    assert int(new.step) == epochs * minibatches  # one optimizer step per minibatch
    leaves = zip(jax.tree.leaves(want), jax.tree.leaves(policy))
    assert max(float(jnp.max(jnp.abs(w - p))) for w, p in leaves) > 1e-3  # the check is not empty
    for got, ref in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    # Metrics: the mean over the epochs x minibatches steps, and the rollout's stats beside them.
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-4, abs=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(np.mean(norms), rel=1e-4)
    assert float(metrics["update_norm"]) == pytest.approx(LR * np.mean(norms), rel=1e-4)
    assert float(metrics["reward"]) == 0.25
    if epochs > 1:  # later epochs move: the last minibatch's loss is not the first one's
        assert abs(losses[-1] - losses[minibatches - 1]) > 1e-4


@pytest.mark.parametrize("minibatches", [3, 8])
def test_minibatches_that_split_a_group_are_refused(rollout, minibatches):
    """8 rows of 4 groups: 3 minibatches do not divide them, 8 would split every group."""
    model, _, state, ro = rollout
    update = train.make_critic_free_update(
        model, optax.sgd(LR), _config(num_minibatches=minibatches)
    )
    with pytest.raises(ValueError, match=f"num_minibatches={minibatches} must split the 4 groups"):
        jax.eval_shape(update, state, ro)
