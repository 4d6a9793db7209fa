"""LoRA beyond the policy's own loss, against independent computations:

- a reward model with adapters on its trunk and the head trained beside them: its step equals
  the Bradley-Terry loss of the merged reward model, differentiated through the merge;
- PPO with adapters on the policy (its base the reference) and on the critic (on the reward
  model's trunk): the rollout equals the plain rollout of the merged models, and the update
  equals the plain PPO loss's gradient taken through the merges;
- LoRA dropout: the mask read back from an identity adapter, the step's key plumbing
  (`make_step` -> `lora_loss`), no dropout outside training steps, and its refusal by the
  on-policy methods.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import lora, models, train
from rlhf_jax.models.projection import LORA, LORA_DROPOUT_RNG, Projection

CFG = models.get_config("llama-tiny", vocab_size=48, max_len=24, n_layers=1)
LORA_CFG = lora.LoraConfig(rank=4, alpha=8.0)


def _randomize(tree, seed, std=0.05):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def _pairs(b=4, t=10, seed=3):
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(2, CFG.vocab_size, (b, t)).astype(np.int32)
        n = rng.integers(6, t + 1, b)
        mask = (np.arange(t)[None] < n[:, None]).astype(np.int32)
        batch[f"{side}_tokens"] = jnp.asarray(tokens * mask)
        batch[f"{side}_attention_mask"] = jnp.asarray(mask)
    return batch


def test_lora_reward_model_trains_adapters_and_head_like_the_merged_model():
    lm = models.init_params(CFG, jax.random.key(0))
    params = models.init_reward_params(CFG, jax.random.key(1), lm)
    adapters = _randomize(lora.init_adapters(params, LORA_CFG, jax.random.key(2)), 4)
    assert set(adapters) == {"transformer"}  # on the trunk; the head is not a target
    trained = lora.trained(adapters, {"head": params["head"]})
    trunk = {"transformer": params["transformer"]}
    rm = lora.LoraRewardModel(CFG, LORA_CFG)
    tx = optax.sgd(0.5)
    step = train.make_step(lora.lora_loss(train.make_reward_loss(rm)), tx)
    state = train.create_train_state(trained, tx, 0, frozen={"base": trunk})
    batch = _pairs()
    new, metrics = jax.jit(step)(state, batch)

    plain = train.make_reward_loss(models.RewardModel(CFG))

    def merged_loss(tr):
        ad, mods = lora.split_trained(tr)
        return plain(lora.merge({**trunk, **mods}, ad, LORA_CFG), batch)

    (want, want_m), grads = jax.jit(jax.value_and_grad(merged_loss, has_aux=True))(trained)
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(metrics["accuracy"]) == float(want_m["accuracy"])
    for after, before, g in zip(
        jax.tree.leaves(new.params), jax.tree.leaves(trained), jax.tree.leaves(grads)
    ):
        np.testing.assert_allclose(after - before, -0.5 * np.asarray(g), atol=2e-6)
    assert float(jnp.abs(grads["modules"]["head"]["kernel"]).max()) > 0  # the head trains
    for x, y in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(trunk)):
        np.testing.assert_array_equal(x, y)  # the trunk is frozen


def _ppo_setup(reward: bool):
    base = models.init_params(CFG, jax.random.key(0))
    rm_params = models.init_reward_params(CFG, jax.random.key(1), _randomize(base, 9, 0.02))
    value_full = models.init_value_params(CFG, jax.random.key(2), rm_params["transformer"])
    value_full["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(3), (CFG.d_model, 1))
    policy_ad = _randomize(lora.init_adapters(base, LORA_CFG, jax.random.key(4)), 5)
    value_ad = _randomize(lora.init_adapters(value_full, LORA_CFG, jax.random.key(6)), 7)
    value_tr = lora.trained(value_ad, {"head": value_full["head"]})
    cfg = train.PPOConfig(max_new_tokens=6, ppo_epochs=1, num_minibatches=1, eos_id=1, pad_id=0)
    reward_fn = train.reward_model_fn(models.RewardModel(CFG)) if reward else None
    tx = optax.sgd(0.3)

    def state(policy, value, ref, rm=rm_params if reward else None):
        return train.create_ppo_state(
            cfg, policy_params=policy, value_params=value, ref_params=ref,
            policy_optimizer=tx, value_optimizer=tx, rng=0, reward_params=rm,
        )  # fmt: skip

    lora_state = state(policy_ad, value_tr, base)
    trunk = rm_params["transformer"] if reward else base
    merged_value = lora.merge(
        {"transformer": trunk, "head": value_full["head"]}, value_ad, LORA_CFG
    )
    plain_state = state(lora.merge(base, policy_ad, LORA_CFG), merged_value, base)
    nets = (lora.LoraTransformer(CFG, LORA_CFG), lora.LoraValueModel(CFG, LORA_CFG))
    plain_nets = (models.Transformer(CFG), models.ValueModel(CFG))
    fns = train.make_ppo(*nets, tx, tx, cfg, reward_fn=reward_fn)
    plain_fns = train.make_ppo(*plain_nets, tx, tx, cfg, reward_fn=reward_fn)
    prompts = jax.random.randint(jax.random.key(8), (4, 5), 2, CFG.vocab_size)
    batch = {"prompt_tokens": prompts, "prompt_mask": jnp.ones_like(prompts)}
    return cfg, lora_state, plain_state, fns, plain_fns, plain_nets, batch, (base, trunk)


@pytest.mark.parametrize("reward", [True, False], ids=["reward_model", "host_reward"])
def test_ppo_with_lora_policy_and_critic_equals_the_merged_models(reward):
    cfg, state, plain_state, fns, plain_fns, plain_nets, batch, (base, trunk) = _ppo_setup(reward)
    _, ro = jax.jit(fns.rollout)(state, batch)
    _, want = jax.jit(plain_fns.rollout)(plain_state, batch)
    np.testing.assert_array_equal(ro.response_tokens, want.response_tokens)
    for name in ("logps", "ref_logps", "values", "kl_exact"):
        np.testing.assert_allclose(getattr(ro, name), getattr(want, name), atol=3e-5, err_msg=name)
    assert float(jnp.abs(ro.logps - ro.ref_logps).max()) > 1e-3  # the adapters matter
    scores = jnp.linspace(-1.0, 1.0, 4)
    _, ro = jax.jit(fns.score)(state, ro.replace(scores=scores))
    new, metrics = jax.jit(fns.update)(state, ro)

    # Independent: PPO's loss of the merged models on the same rollout, differentiated through
    # the merges w.r.t. the adapters and the critic's head.
    plain_loss = train.make_ppo_loss(*plain_nets, cfg)
    mb = {k: getattr(ro, k) for k in train.ppo_update._TRAIN_FIELDS}

    def loss(trees):
        policy_ad, value_tr = trees
        value_ad, mods = lora.split_trained(value_tr)
        merged = lora.merge({"transformer": trunk, **mods}, value_ad, LORA_CFG)
        return plain_loss((lora.merge(base, policy_ad, LORA_CFG), merged), mb)

    trees = (state.policy_params, state.value_params)
    (want_loss, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trees)
    assert float(metrics["loss"]) == pytest.approx(float(want_loss), rel=1e-5, abs=1e-6)
    new_trees = (new.policy_params, new.value_params)
    for after, before, g in zip(
        jax.tree.leaves(new_trees), jax.tree.leaves(trees), jax.tree.leaves(grads)
    ):
        np.testing.assert_allclose(after - before, -0.3 * np.asarray(g), atol=3e-6)
    for x, y in zip(jax.tree.leaves(new.ref_params), jax.tree.leaves(base)):
        np.testing.assert_array_equal(x, y)  # one base, frozen: it is also the reference


def test_dropout_mask_read_back_through_an_identity_adapter():
    d, n, rate = 16, 256, 0.25
    x = jax.random.normal(jax.random.key(0), (n, d)) + 3.0  # no zeros
    proj = Projection((d,), use_bias=False)
    params = {"kernel": jnp.zeros((d, d))}
    adapter = {"a": jnp.eye(d), "b": jnp.eye(d), "scale": jnp.float32(1.0)}
    variables = {"params": params, LORA: {**adapter, "dropout": jnp.float32(rate)}}
    y = proj.apply(variables, x, rngs={LORA_DROPOUT_RNG: jax.random.key(1)})
    ratio = np.asarray(y / x)  # the mask / (1 - rate), elementwise
    kept = np.isclose(ratio, 1 / (1 - rate), rtol=1e-5)
    assert np.all(kept | (ratio == 0))
    assert abs(kept.mean() - (1 - rate)) < 0.03  # 4096 draws: 4.5 standard deviations
    np.testing.assert_allclose(proj.apply(variables, x), x, rtol=1e-6)  # no key: no dropout


def _sft_batch(b=4, t=10):
    tokens = jax.random.randint(jax.random.key(7), (b, t), 2, CFG.vocab_size)
    mask = jnp.ones((b, t), jnp.int32)
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": mask.at[:, 0].set(0)}


def test_dropout_key_comes_from_the_step_and_only_training_steps_drop():
    base = models.init_params(CFG, jax.random.key(0))
    drop = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.3)
    adapters = _randomize(lora.init_adapters(base, drop, jax.random.key(1)), 2)
    tx = optax.sgd(0.5)
    state = train.create_train_state(adapters, tx, 0, frozen={"base": base})
    batch = _sft_batch()
    loss = lora.lora_loss(train.make_sft_loss(lora.LoraTransformer(CFG, drop)))
    no_drop = lora.lora_loss(train.make_sft_loss(lora.LoraTransformer(CFG, LORA_CFG)))
    step = jax.jit(train.make_step(loss, tx))
    new, metrics = step(state, batch)

    # The key the step passes is `loss_key(state)`: the loss with that key by hand, and its
    # gradient, reproduce the step.
    def by_hand(ad, key):
        return loss(ad, batch, frozen=state.frozen, hparams={}, rng=key)[0]

    want, grads = jax.jit(jax.value_and_grad(by_hand))(adapters, train.step.loss_key(state))
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-6)
    for after, before, g in zip(
        jax.tree.leaves(new.params), jax.tree.leaves(adapters), jax.tree.leaves(grads)
    ):
        np.testing.assert_allclose(after - before, -0.5 * np.asarray(g), atol=2e-6)
    plain = float(
        jax.jit(lambda ad: no_drop(ad, batch, frozen=state.frozen, hparams={})[0])(adapters)
    )
    assert float(metrics["loss"]) != pytest.approx(plain, rel=1e-4)  # dropout acted
    unkeyed = float(jax.jit(lambda ad: by_hand(ad, None))(adapters))
    assert unkeyed == pytest.approx(plain, rel=1e-6)  # no key: no dropout
    _, next_step = step(state.replace(step=state.step + 1), batch)  # another step: another mask
    assert float(next_step["loss"]) != float(metrics["loss"])
    _, metrics2 = step(state, batch)  # deterministic given the state: resumable
    assert float(metrics2["loss"]) == float(metrics["loss"])


def test_on_policy_methods_refuse_dropout():
    drop = lora.LoraConfig(rank=2, dropout=0.1)
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="PPO sample with the policy they train, so set dropout"):
        train.make_ppo(lora.LoraTransformer(CFG, drop), models.ValueModel(CFG), tx, tx,
                       train.PPOConfig())  # fmt: skip
    cf = train.CriticFreeConfig(algo="grpo", group_size=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="critic-free methods sample with the policy"):
        train.make_critic_free(lora.LoraTransformer(CFG, drop), tx, cf)
