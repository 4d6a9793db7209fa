"""SFT step and train state: loss vs a NumPy masked NLL, norms vs direct computations, overfitting,
no recompilation, the optimizer schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_lm

from rlhf_jax.train import (
    TrainState,
    create_train_state,
    make_optimizer,
    make_sft_eval,
    make_sft_step,
    stack_states,
    unstack_state,
)

VOCAB = tiny_lm.config().vocab_size  # the conftest's tiny_config's


def demo_batch(seed, b=4, t=12, v=VOCAB):
    """Right-padded demonstrations: prompt of 2-4 tokens, response to a random length."""
    rs = np.random.RandomState(seed)
    tokens = np.zeros((b, t), np.int32)
    attn = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), np.int32)
    for i in range(b):
        n_prompt = rs.randint(2, 5)
        length = rs.randint(n_prompt + 2, t + 1)
        tokens[i, :length] = rs.randint(1, v, size=length)
        attn[i, :length] = 1
        loss[i, n_prompt:length] = 1
    return {"tokens": tokens, "attention_mask": attn, "loss_mask": loss}


def numpy_nll(logits, batch):
    """Plain loop: per-row list of -log p(target) over loss-masked targets."""
    logits = np.asarray(logits, np.float64)
    rows = []
    for b in range(logits.shape[0]):
        nll = []
        for t in range(logits.shape[1] - 1):
            if batch["loss_mask"][b, t + 1]:
                z = logits[b, t]
                logz = np.log(np.sum(np.exp(z - z.max()))) + z.max()
                nll.append(logz - z[batch["tokens"][b, t + 1]])
        rows.append(nll)
    return rows


@pytest.fixture(scope="module")
def sft(tiny_model):
    """One optimizer and one compiled, donating, trace-counting SFT step for the whole module."""
    opt = make_optimizer(1e-2)
    traces = []
    step = make_sft_step(tiny_model, opt)

    def counted(state, batch):
        traces.append(1)
        return step(state, batch)

    return opt, jax.jit(counted, donate_argnums=0), traces


def fresh_state(params, opt):
    """A state on a copy of `params` (the step donates its state)."""
    return create_train_state(jax.tree.map(jnp.copy, params), opt, 0)


def test_sft_step_matches_numpy(tiny_model, tiny_params, sft):
    params, (opt, step, _) = tiny_params, sft
    batch = demo_batch(1)
    logits = jax.jit(tiny_model.apply)({"params": params}, batch["tokens"], batch["attention_mask"])
    rows = numpy_nll(logits, batch)
    want = np.sum([x for r in rows for x in r]) / sum(len(r) for r in rows)
    new_state, m = step(fresh_state(params, opt), batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["nll_token"], want, rtol=1e-5)
    assert int(new_state.step) == 1
    assert int(m["num_tokens"]) == sum(len(r) for r in rows)

    # grad_norm is the norm of the raw gradient; update_norm the norm of the param change.
    def plain_loss(p):
        lg = tiny_model.apply(
            {"params": p}, batch["tokens"], attention_mask=batch["attention_mask"]
        )
        lp = jax.nn.log_softmax(lg[:, :-1], -1)
        lp = jnp.take_along_axis(lp, batch["tokens"][:, 1:, None], -1)[..., 0]
        mask = batch["loss_mask"][:, 1:]
        return -(lp * mask).sum() / mask.sum()

    g = jax.jit(jax.grad(plain_loss))(params)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(g), rtol=1e-4)
    diff = jax.tree.map(lambda a, b: a - b, new_state.params, params)
    np.testing.assert_allclose(m["update_norm"], optax.tree.norm(diff), rtol=1e-3)
    assert np.isfinite(float(m["grad_norm"]))


def test_sft_example_reduction_matches_numpy(tiny_model, tiny_params):
    params = tiny_params
    batch = demo_batch(3)
    logits = jax.jit(tiny_model.apply)({"params": params}, batch["tokens"], batch["attention_mask"])
    want = np.mean([np.mean(r) for r in numpy_nll(logits, batch)])
    m = jax.jit(make_sft_eval(tiny_model, reduction="example"))(params, batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        make_sft_step(tiny_model, optax.sgd(1.0), reduction="sum")


def test_sft_overfits_without_recompiling(tiny_params, sft):
    opt, step, traces = sft
    batch = demo_batch(2)
    state = fresh_state(tiny_params, opt)
    losses = []
    for _ in range(20):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert len(traces) == 1 and step._cache_size() == 1  # compiled once for the whole module
    assert int(state.step) == 20
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(np.isfinite(losses))


def test_optimizer_schedule_and_clipping():
    p = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    opt = make_optimizer(1.0, warmup_steps=2, total_steps=6, max_grad_norm=1.0, b1=0.0, b2=0.0)
    st = opt.init(p)
    g = {"w": 100.0 * jnp.ones((2, 2)), "b": 100.0 * jnp.ones((2,))}
    sizes = []
    for _ in range(6):
        u, st = opt.update(g, st, p)
        sizes.append(float(jnp.abs(u["b"][0])))
    # Adam with b1=b2=0 gives |update| = lr * |g| / (|g| + eps) ~ lr: the schedule itself.
    np.testing.assert_allclose(sizes, [0.0, 0.5, 1.0, 0.75, 0.5, 0.25], atol=1e-4)
    # Weight decay only on rank >= 2 leaves.
    opt = make_optimizer(0.1, weight_decay=0.5, max_grad_norm=None)
    zero = jax.tree.map(jnp.zeros_like, p)
    u, _ = opt.update(zero, opt.init(p), p)
    np.testing.assert_allclose(u["w"], -0.05 * np.ones((2, 2)), atol=1e-7)
    np.testing.assert_allclose(u["b"], np.zeros(2), atol=1e-7)


def test_state_stack_and_unalias():
    opt = make_optimizer(1e-3)
    w = jnp.ones((3,))
    s = create_train_state({"w": w}, opt, 1, frozen={"w": w}, hparams={"beta": 0.1})
    assert s.frozen["w"] is not s.params["w"]  # donation-safe copy
    assert s.hparams["beta"].dtype == jnp.float32
    stacked = stack_states([s, s.replace(hparams={"beta": jnp.float32(0.5)})])
    assert isinstance(stacked, TrainState) and stacked.hparams["beta"].shape == (2,)
    np.testing.assert_allclose(unstack_state(stacked, 1).hparams["beta"], 0.5)
