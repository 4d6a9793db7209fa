"""PPO: rollout shapes and masks, rewards/GAE/whitening vs a NumPy loop, the first update (KL 0
when policy == reference), the adaptive KL coefficient, no recompilation, and the reward model
inside the program == on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.models import RewardModel, ValueModel, init_reward_params, init_value_params
from rlhf_jax.train import (
    PPOConfig,
    create_ppo_state,
    make_ppo,
    response_token_lists,
    reward_model_fn,
)

EOS, PAD, N = 3, 0, 6
PPO = PPOConfig(
    kl_coef=0.1,
    kl_target=0.5,
    kl_horizon=100.0,
    kl_estimator="k3",
    lam=0.9,
    ppo_epochs=2,
    num_minibatches=2,
    missing_eos_penalty=1.0,
    max_new_tokens=N,
    eos_id=EOS,
    pad_id=PAD,
)
PROMPTS = {  # LEFT-padded
    "prompt_tokens": np.array(
        [[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13], [0, 0, 0, 14]] * 2, np.int32
    ),
    "prompt_mask": np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]] * 2, np.int32),
}
B = PROMPTS["prompt_tokens"].shape[0]


def host_reward(ro):
    """A reward of the tokens computed on the host: fraction of even response tokens."""
    return np.array(
        [np.mean([t % 2 == 0 for t in r]) for r in response_token_lists(ro)], np.float32
    )


def policy_params(cfg, params):
    """`params` nudged so that EOS is likely enough that some rows end early (new dicts: the
    shared params stay as they are)."""
    p = jax.tree.map(lambda x: x, params)
    u = np.zeros((cfg.d_model,), np.float32)
    u[0] = 1.2
    p["final_norm"]["bias"] = jnp.asarray(u)
    p["embed"]["embedding"] = p["embed"]["embedding"].at[EOS].set(jnp.asarray(u))
    return p


@pytest.fixture(scope="module")
def ppo(tiny_config, tiny_model, tiny_params):
    # Plain SGD keeps params linear in the gradients, so fused vs host params compare tightly
    # (Adam's g / (|g| + eps) amplifies rounding where g ~ eps).
    opt = optax.sgd(0.3)
    fns = make_ppo(
        tiny_model,
        ValueModel(tiny_config),
        opt,
        opt,
        PPO,
        reward_fn=reward_model_fn(RewardModel(tiny_config)),
    )
    traces = {"rollout": 0, "score": 0, "update": 0, "rollout_and_score": 0}

    def counted(name, fn):
        def wrapped(*args):
            traces[name] += 1
            return fn(*args)

        return wrapped

    jitted = {
        "rollout": jax.jit(counted("rollout", fns.rollout)),
        "score": jax.jit(counted("score", fns.score)),
        "update": jax.jit(counted("update", fns.update), donate_argnums=0),
        "rollout_and_score": jax.jit(counted("rollout_and_score", fns.rollout_and_score)),
        "step": jax.jit(fns.step, donate_argnums=0),
    }
    pol = policy_params(tiny_config, tiny_params)
    rm = init_reward_params(tiny_config, jax.random.PRNGKey(2))

    def new_state(ref_scale=None, value_head=False):
        """Fresh state; ref == policy unless ref_scale sharpens the reference's logits."""
        policy = jax.tree.map(jnp.copy, pol)  # the update donates the state's buffers
        ref = policy
        if ref_scale is not None:
            ref = jax.tree.map(jnp.copy, pol)
            ref["embed"] = {"embedding": pol["embed"]["embedding"] * ref_scale}
        value = init_value_params(tiny_config, jax.random.PRNGKey(1), policy)
        if value_head:
            value["head"]["kernel"] = 0.3 * jax.random.normal(
                jax.random.PRNGKey(3), (tiny_config.d_model, 1)
            )
        reward = jax.tree.map(jnp.copy, rm)
        return create_ppo_state(
            PPO,
            policy_params=policy,
            value_params=value,
            ref_params=ref,
            policy_optimizer=opt,
            value_optimizer=opt,
            rng=7,
            reward_params=reward,
        )

    return jitted, traces, new_state, rm


def test_rollout_shapes_and_masks(ppo):
    jitted, _, new_state, _ = ppo
    state, ro = jitted["rollout"](new_state(), PROMPTS)
    assert ro.response_tokens.shape == ro.response_mask.shape == ro.logps.shape == (B, N)
    assert ro.values.shape == ro.ref_logps.shape == ro.kl_exact.shape == (B, N)
    assert ro.has_eos.shape == ro.scores.shape == (B,)
    np.testing.assert_array_equal(ro.query_tokens, PROMPTS["prompt_tokens"])
    tok, mask, has_eos = map(np.asarray, (ro.response_tokens, ro.response_mask, ro.has_eos))
    for b in range(B):
        n = int(mask[b].sum())
        assert n >= 1 and np.all(mask[b, :n] == 1) and np.all(mask[b, n:] == 0)  # a prefix
        assert np.all(tok[b, n:] == PAD)
        eos_at = np.flatnonzero(tok[b, :n] == EOS)
        if has_eos[b]:
            assert list(eos_at) == [n - 1]  # ends with its only EOS
        else:
            assert n == N and eos_at.size == 0
    assert 0 < has_eos.sum() < B  # this seed gives both kinds of rows
    # Teacher-forced log-probs agree with the sampler's; policy == reference at step 0.
    np.testing.assert_allclose(ro.logps, ro.sample_logps, atol=2e-5)
    np.testing.assert_array_equal(ro.ref_logps, ro.logps)
    np.testing.assert_allclose(ro.kl_exact, 0.0, atol=1e-6)
    np.testing.assert_array_equal(ro.values, 0.0)  # zero-initialised value head
    np.testing.assert_array_equal(np.asarray(ro.logps)[mask == 0], 0.0)


def numpy_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        nxt_v, nxt_a = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                nxt_v, nxt_a = 0.0, 0.0
                continue
            delta = rewards[b, t] + gamma * nxt_v - values[b, t]
            adv[b, t] = delta + gamma * lam * nxt_a
            nxt_v, nxt_a = values[b, t], adv[b, t]
    return adv, (adv + values) * mask


def test_score_matches_numpy(ppo):
    jitted, _, new_state, _ = ppo
    state, ro = jitted["rollout"](new_state(ref_scale=4.0, value_head=True), PROMPTS)
    scores = host_reward(ro)
    _, ro = jitted["score"](state, ro.replace(scores=jnp.asarray(scores)))
    lp, ref, v = (np.asarray(x, np.float64) for x in (ro.logps, ro.ref_logps, ro.values))
    mask, has_eos = np.asarray(ro.response_mask), np.asarray(ro.has_eos)
    log_r = ref - lp
    k3 = (np.exp(log_r) - 1 - log_r) * mask
    assert k3.sum() > 1e-3  # the sharpened reference differs
    want = -0.1 * k3
    lengths = mask.sum(1)
    penalized = scores - 1.0 * (has_eos == 0)  # TRL: subtract the missing-EOS penalty
    want[np.arange(B), lengths - 1] += penalized
    np.testing.assert_allclose(ro.rewards, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ro.scores, scores)
    adv, ret = numpy_gae(want, v, mask, 1.0, 0.9)
    np.testing.assert_allclose(ro.returns, ret, rtol=1e-5, atol=1e-6)
    flat = adv[mask > 0]
    white = (adv - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(ro.advantages, white, rtol=1e-4, atol=1e-4)


def expected_coef(coef, ro):
    lp, ref = np.asarray(ro.logps, np.float64), np.asarray(ro.ref_logps, np.float64)
    log_r = ref - lp
    seq_k3 = ((np.exp(log_r) - 1 - log_r) * np.asarray(ro.response_mask)).sum(1)
    err = np.clip(seq_k3.mean() / PPO.kl_target - 1, -0.2, 0.2)
    return coef * (1 + err * B / PPO.kl_horizon), seq_k3.mean()


def test_first_update_kl_zero_and_coef_decreases(ppo):
    jitted, _, new_state, _ = ppo
    state, ro = jitted["rollout"](new_state(), PROMPTS)
    state, ro = jitted["score"](state, ro.replace(scores=jnp.asarray(host_reward(ro))))
    old = jax.tree.map(np.asarray, state.policy_params)
    want_coef, _ = expected_coef(0.1, ro)
    state, m = jitted["update"](state, ro)
    assert all(np.isfinite(float(v)) for v in m.values()), m
    for k in ("kl_k1", "kl_k3", "kl_exact"):
        assert abs(float(m[k])) < 1e-6, (k, m[k])
    # KL 0 < target: the coefficient shrinks by the clipped proportional error (-0.2).
    np.testing.assert_allclose(m["kl_coef"], 0.1)
    np.testing.assert_allclose(state.kl_coef, want_coef, rtol=1e-6)
    assert float(state.kl_coef) < 0.1
    assert int(state.step) == 1
    changed = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state.policy_params, old)
    assert max(jax.tree.leaves(changed)) > 0
    np.testing.assert_allclose(m["score"], np.mean(ro.scores), rtol=1e-6)
    np.testing.assert_allclose(m["eos_rate"], np.mean(ro.has_eos))
    np.testing.assert_allclose(m["response_length"], np.asarray(ro.response_mask).sum(1).mean())
    assert float(m["grad_norm"]) > 0 and float(m["update_norm"]) > 0


def test_adaptive_kl_coef_increases_above_target(ppo):
    jitted, _, new_state, _ = ppo
    state, ro = jitted["rollout"](new_state(ref_scale=4.0), PROMPTS)
    state, ro = jitted["score"](state, ro.replace(scores=jnp.asarray(host_reward(ro))))
    want_coef, observed = expected_coef(0.1, ro)
    assert observed > PPO.kl_target
    state, m = jitted["update"](state, ro)
    np.testing.assert_allclose(state.kl_coef, want_coef, rtol=1e-6)
    assert float(state.kl_coef) > 0.1
    np.testing.assert_allclose(m["kl_k3"], observed, rtol=1e-4)
    assert float(m["kl_exact"]) > 0


def test_host_path_does_not_recompile(ppo):
    jitted, traces, new_state, _ = ppo
    state = new_state()
    for _ in range(3):
        state, ro = jitted["rollout"](state, PROMPTS)
        state, ro = jitted["score"](state, ro.replace(scores=jnp.asarray(host_reward(ro))))
        state, m = jitted["update"](state, ro)
        assert np.isfinite(float(m["loss"]))
    assert int(state.step) == 3
    for name in ("rollout", "score", "update"):
        assert traces[name] == 1 and jitted[name]._cache_size() == 1, name


def test_reward_model_path_equals_host_path(ppo, tiny_config):
    jitted, traces, new_state, rm = ppo
    fused, host = new_state(), new_state()
    rm_fwd = jax.jit(RewardModel(tiny_config).apply)
    for _ in range(2):
        fused, ro_fused = jitted["rollout_and_score"](fused, PROMPTS)
        host, ro = jitted["rollout"](host, PROMPTS)
        tokens = jnp.concatenate([ro.query_tokens, ro.response_tokens], 1)
        mask = jnp.concatenate([ro.query_mask, ro.response_mask], 1)
        scores = rm_fwd({"params": rm}, tokens, mask)  # the reward model outside the program
        host, ro = jitted["score"](host, ro.replace(scores=scores))
        for a, b in zip(jax.tree.leaves(ro_fused), jax.tree.leaves(ro)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        fused, _ = jitted["update"](fused, ro_fused)
        host, _ = jitted["update"](host, ro)
    assert traces["rollout_and_score"] == 1
    # The fused step (rollout, reward model, score, update) traces to the same state structure.
    out_state, metrics = jax.eval_shape(jitted["step"], new_state(), PROMPTS)
    assert jax.tree.structure(out_state) == jax.tree.structure(fused)
    assert all(v.shape == () for v in metrics.values()) and "kl_exact" in metrics


def test_host_reward_on_token_ids_or_on_text(ppo, tiny_config, tiny_model):
    """`stages.make_host_reward_ppo_step`: the reward sees each row's prompt + response token ids
    (EOS kept) or their decoded text, and its scores are the ones the update reports; the same
    iteration as the compiled rollout -> score(host scores) -> update path."""
    from rlhf_jax import sharding
    from rlhf_jax.stages import make_host_reward_ppo_step

    jitted, _, new_state, _ = ppo
    opt = optax.sgd(0.3)
    fns = make_ppo(tiny_model, ValueModel(tiny_config), opt, opt, PPO)  # no JAX reward
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    _, ro = jitted["rollout"](new_state(), PROMPTS)
    want_rows = response_token_lists(ro, include_query=True)  # with EOS where emitted
    seen = {}

    def on_tokens(rows):
        seen["tokens"] = rows
        return np.array([np.mean([t % 2 == 0 for t in r]) for r in rows], np.float32)

    class Chars:  # decodes ids as letters; EOS is never passed to it
        eos_id = EOS

        def decode_batch(self, rows):
            assert all(EOS not in r[-1:] for r in rows)
            return ["".join(chr(97 + t % 26) for t in r) for r in rows]

    def on_text(texts):
        seen["text"] = texts
        return np.array([t.count("a") for t in texts], np.float32)

    for on, reward, tok in (("tokens", on_tokens, None), ("text", on_text, Chars())):
        step = make_host_reward_ppo_step(fns, reward, mesh=mesh, on=on, tokenizer=tok)
        _, m = step(new_state(), PROMPTS)
        scores = reward(seen[on])
        np.testing.assert_allclose(m["score"], scores.mean(), rtol=1e-6)
        # The same iteration by hand: compiled rollout, these scores, compiled score + update.
        state, ro_hand = jitted["rollout"](new_state(), PROMPTS)
        state, ro_hand = jitted["score"](state, ro_hand.replace(scores=jnp.asarray(scores)))
        _, m_hand = jitted["update"](state, ro_hand)
        np.testing.assert_allclose(m["loss"], m_hand["loss"], rtol=1e-5, atol=1e-6)
    assert seen["tokens"] == want_rows and any(EOS in r for r in want_rows)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        make_host_reward_ppo_step(fns, on_text, mesh=mesh, on="text")
    with pytest.raises(ValueError, match="on must be one of"):
        make_host_reward_ppo_step(fns, on_text, mesh=mesh, on="ids")


def test_update_logs_its_rollout_and_both_kl_coefs(ppo):
    """The update's rollout statistics, by their definitions from the rollout it trained on:
    score the raw reward, score_penalized after the missing-EOS penalty, rlhf_reward the return
    of the per-token rewards (penalised score - kl_coef * sum_t k3); kl_coef is the coefficient
    that shaped those rewards, kl_coef_next the controller's next one (the new state's)."""
    jitted, _, new_state, _ = ppo
    state, ro = jitted["rollout"](new_state(ref_scale=4.0, value_head=True), PROMPTS)
    state, ro = jitted["score"](state, ro.replace(scores=jnp.asarray(host_reward(ro))))
    want_coef, _ = expected_coef(0.1, ro)
    fields = (ro.logps, ro.ref_logps, ro.advantages, ro.returns)
    lp, ref, adv, ret = (np.asarray(x, np.float64) for x in fields)
    live, has_eos = np.asarray(ro.response_mask) > 0, np.asarray(ro.has_eos)
    scores = np.asarray(ro.scores, np.float64)
    penalized = scores - 1.0 * (has_eos == 0)
    log_r = ref - lp
    k1 = np.where(live, -log_r, 0.0).sum(1)
    k3 = np.where(live, np.exp(log_r) - 1 - log_r, 0.0).sum(1)
    state, m = jitted["update"](state, ro)
    want = {
        "score": scores.mean(),
        "score_penalized": penalized.mean(),
        "rlhf_reward": np.mean(penalized - 0.1 * k3),
        "kl_k1": k1.mean(),
        "kl_k3": k3.mean(),
        "advantage_mean": adv[live].mean(),
        "return_mean": ret[live].mean(),
        "response_length": live.sum(1).mean(),
        "eos_rate": has_eos.mean(),
        "kl_coef": 0.1,
        "kl_coef_next": want_coef,
    }
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(m["kl_coef_next"], state.kl_coef, rtol=1e-7)
    assert abs(want["kl_coef_next"] - 0.1) > 1e-4 and 0 < has_eos.mean() < 1
    assert abs(want["rlhf_reward"] - want["score_penalized"]) > 1e-3
