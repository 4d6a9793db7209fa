"""A sampling temperature on both sides of every log-prob pair a KL or a ratio uses.

At T = 0.7 the policy samples from softmax(logits / T), so every log-prob that enters a ratio
(new against old) or a KL (policy against reference) must be a log-prob of that tempered
distribution, on both sides: the critic-free rollout's `logps` and `ref_logps` and its loss's
new log-probs; PPO's rollout `logps`, `ref_logps`, `kl_exact` and sampler log-probs, and its
loss's new log-probs and entropy. Each is checked against NumPy on the model's own full logits
(`model.apply`, divided by T, log-softmax in float64), with the decoder's log-probs computed
whole and in chunks of positions (`TransformerConfig.logits_chunk`). The references never call
`rlhf_jax.losses` or `rlhf_jax.train.logps`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_lm

from rlhf_jax import train
from rlhf_jax.models import Transformer, ValueModel, init_value_params

T = 0.7
N, EOS, PAD, G = 5, 3, 0, 2
PROMPTS = {  # LEFT-padded, P = 4
    "prompt_tokens": np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13], [0, 0, 0, 14]]),
    "prompt_mask": np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
}
P = PROMPTS["prompt_tokens"].shape[1]
CHUNKS = [None, 3]  # whole logits, or 3 positions at a time (3 divides neither N nor P + N - 1)


_jitter = tiny_lm.jitter


@pytest.fixture(scope="module")
def nets(tiny):
    """(plain model, policy params, reference params, moved policy params)."""
    base = tiny()
    policy = _jitter(base.params, 1, 1.0)
    return base.model, policy, _jitter(policy, 2, 0.5), _jitter(policy, 3, 0.3)


def _np_log_softmax(model, params, q_tok, q_mask, r_tok, r_mask, temperature):
    """[B, N, V] float64 log softmax(logits / temperature) at the positions that predict the N
    response tokens, from the whole logits of one `model.apply`."""
    tokens = np.concatenate([np.asarray(q_tok), np.asarray(r_tok)], 1)
    mask = np.concatenate([np.asarray(q_mask), np.asarray(r_mask)], 1)
    logits = np.asarray(model.apply({"params": params}, tokens, attention_mask=mask), np.float64)
    z = logits[:, P - 1 : P - 1 + N] / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _picked(logp, r_tok, r_mask):
    """[B, N] the log-probs of the response tokens, 0 where the response is masked."""
    out = np.take_along_axis(logp, np.asarray(r_tok)[..., None], -1)[..., 0]
    return np.where(np.asarray(r_mask) > 0, out, 0.0)


def _masked_mean(x, mask):
    m = np.asarray(mask) > 0
    return x[m].mean()


def _chunked(model, chunk):
    return (
        model
        if chunk is None
        else Transformer(dataclasses.replace(model.config, logits_chunk=chunk))
    )


def _check_visible(logp_t, model, params, ro):
    """The check is not empty: at temperature 1 the log-probs are far from those at T."""
    at_one = _np_log_softmax(model, params, ro.query_tokens, ro.query_mask, ro.response_tokens,
                             ro.response_mask, 1.0)  # fmt: skip
    gap = np.abs(_picked(at_one, ro.response_tokens, ro.response_mask) - logp_t).max()
    assert gap > 1e-2, gap


# ---------------------------------------------------------------------------------------------
# Critic-free: rollout (policy and reference) and loss.


@pytest.mark.parametrize("chunk", CHUNKS)
def test_critic_free_rollout_and_loss_use_the_sampling_temperature_on_both_sides(nets, chunk):
    plain, policy, ref, moved = nets
    model = _chunked(plain, chunk)
    cfg = train.CriticFreeConfig(
        algo="grpo", group_size=G, max_new_tokens=N, temperature=T, eos_id=EOS, pad_id=PAD
    )
    tx = optax.sgd(0.1)
    state = train.create_critic_free_state(policy, tx, 5, ref_params=ref, kl_coef=0.05)
    fns = train.make_critic_free(model, tx, cfg)
    _, ro = jax.jit(fns.rollout)(state, PROMPTS)
    r_tok, r_mask = np.asarray(ro.response_tokens), np.asarray(ro.response_mask)
    args = (ro.query_tokens, ro.query_mask, r_tok, r_mask, T)
    lp_policy = _np_log_softmax(plain, policy, *args)
    lp_ref = _np_log_softmax(plain, ref, *args)
    want_logps = _picked(lp_policy, r_tok, r_mask)
    want_ref = _picked(lp_ref, r_tok, r_mask)
    _check_visible(want_logps, plain, policy, ro)
    np.testing.assert_allclose(ro.logps, want_logps, atol=2e-5)
    np.testing.assert_allclose(ro.ref_logps, want_ref, atol=2e-5)

    # The loss at moved params: new log-probs at T against the rollout's old ones (ratio) and
    # the reference's (k3 KL), GRPO's clipped loss aggregated per sequence, all by hand.
    adv = np.random.default_rng(0).normal(size=(r_mask.shape[0], 1)) * np.ones((1, N))
    ro = ro.replace(advantages=jnp.asarray(np.where(r_mask > 0, adv, 0.0), jnp.float32))
    loss_fn = train.make_critic_free_loss(model, cfg)
    hp = {"kl_coef": jnp.float32(0.05)}
    loss, metrics = jax.jit(lambda p, r: loss_fn(p, r, frozen=None, hparams=hp))(moved, ro)
    lp_new_full = _np_log_softmax(plain, moved, *args)
    lp_new = _picked(lp_new_full, r_tok, r_mask)
    old, ref_lp = np.asarray(ro.logps, np.float64), np.asarray(ro.ref_logps, np.float64)
    rho = np.exp(lp_new - old)
    a = np.asarray(ro.advantages, np.float64)
    pg = np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.2))
    k3 = np.exp(ref_lp - lp_new) - (ref_lp - lp_new) - 1.0
    live = r_mask > 0
    per_row = [(pg + 0.05 * k3)[b][live[b]].mean() for b in range(len(live)) if live[b].any()]
    assert float(loss) == pytest.approx(np.mean(per_row), rel=1e-4, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(_masked_mean(k3, r_mask), rel=1e-4, abs=1e-6)
    assert float(metrics["approx_kl"]) == pytest.approx(
        _masked_mean(0.5 * (lp_new - old) ** 2, r_mask), rel=1e-4, abs=1e-7
    )
    entropy = -(np.exp(lp_new_full) * lp_new_full).sum(-1)  # of softmax(logits / T)
    assert float(metrics["entropy"]) == pytest.approx(_masked_mean(entropy, r_mask), rel=1e-5)


def test_critic_free_rollout_samples_at_its_temperature(nets):
    """The same state and key at temperature 0.7 and at 1 sample different completions (the
    sampler is told the configured temperature, not only the log-probs)."""
    plain, policy, ref, _ = nets
    tx = optax.sgd(0.1)
    state = train.create_critic_free_state(policy, tx, 5, ref_params=ref)
    tokens = {}
    for t in (T, 1.0):
        cfg = train.CriticFreeConfig(
            algo="grpo", group_size=G, max_new_tokens=N, temperature=t, eos_id=EOS, pad_id=PAD
        )
        _, ro = jax.jit(train.make_critic_free(plain, tx, cfg).rollout)(state, PROMPTS)
        tokens[t] = np.asarray(ro.response_tokens)
    assert (tokens[T] != tokens[1.0]).any()


# ---------------------------------------------------------------------------------------------
# PPO: rollout (sampler, policy, reference, exact KL) and loss.


@pytest.mark.parametrize("chunk", CHUNKS)
def test_ppo_rollout_and_loss_use_the_sampling_temperature_on_both_sides(nets, chunk):
    plain, policy, ref, moved = nets
    model = _chunked(plain, chunk)
    cfg = plain.config
    value_model = ValueModel(cfg)
    values = init_value_params(cfg, jax.random.key(4), policy)
    ppo = train.PPOConfig(max_new_tokens=N, temperature=T, eos_id=EOS, pad_id=PAD, clip_eps=0.2)
    tx = optax.sgd(0.1)
    state = train.create_ppo_state(
        ppo, policy_params=policy, value_params=values, ref_params=ref, policy_optimizer=tx,
        value_optimizer=tx, rng=6,
    )  # fmt: skip
    _, ro = jax.jit(train.make_ppo_rollout(model, value_model, ppo))(state, PROMPTS)
    r_tok, r_mask = np.asarray(ro.response_tokens), np.asarray(ro.response_mask)
    args = (ro.query_tokens, ro.query_mask, r_tok, r_mask, T)
    lp_policy = _np_log_softmax(plain, policy, *args)
    lp_ref = _np_log_softmax(plain, ref, *args)
    want_logps = _picked(lp_policy, r_tok, r_mask)
    _check_visible(want_logps, plain, policy, ro)
    np.testing.assert_allclose(ro.logps, want_logps, atol=2e-5)
    np.testing.assert_allclose(ro.sample_logps * r_mask, want_logps, atol=2e-5)  # the sampler's
    np.testing.assert_allclose(ro.ref_logps, _picked(lp_ref, r_tok, r_mask), atol=2e-5)
    kl = np.where(r_mask > 0, (np.exp(lp_policy) * (lp_policy - lp_ref)).sum(-1), 0.0)
    assert kl.sum() > 1e-2
    np.testing.assert_allclose(ro.kl_exact, kl, rtol=1e-4, atol=2e-6)

    # The loss at moved params: its new log-probs (ratio against the rollout's) and entropy.
    adv = np.random.default_rng(1).normal(size=r_mask.shape) * r_mask
    mb = {
        "query_tokens": ro.query_tokens, "query_mask": ro.query_mask, "response_tokens": r_tok,
        "response_mask": r_mask, "logps": ro.logps, "values": ro.values,
        "advantages": jnp.asarray(adv, jnp.float32), "returns": ro.values,
    }  # fmt: skip
    loss_fn = train.make_ppo_loss(model, value_model, ppo)
    _, metrics = jax.jit(lambda p, b: loss_fn(p, b))((moved, values), mb)
    lp_new_full = _np_log_softmax(plain, moved, *args)
    lp_new = _picked(lp_new_full, r_tok, r_mask)
    rho = np.exp(lp_new - np.asarray(ro.logps, np.float64))
    pg = np.maximum(-adv * rho, -adv * np.clip(rho, 0.8, 1.2))
    assert float(metrics["policy_loss"]) == pytest.approx(_masked_mean(pg, r_mask), rel=1e-4)
    assert float(metrics["approx_kl"]) == pytest.approx(
        _masked_mean(0.5 * np.log(rho) ** 2, r_mask), rel=1e-4, abs=1e-7
    )
    entropy = -(np.exp(lp_new_full) * lp_new_full).sum(-1)
    assert float(metrics["entropy"]) == pytest.approx(_masked_mean(entropy, r_mask), rel=1e-5)
