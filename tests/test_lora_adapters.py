"""LoRA (`rlhf_jax.lora`) against independent computations.

- fresh adapters (B = 0) leave every family's logits exactly unchanged;
- the adapted forward (x W + s (x A) B inside each projection) equals the plain model on the
  merged kernels W + s A B, in a full pass and in KV-cache greedy decoding;
- adapter gradients against central finite differences;
- a DPO step on the adapters with the base as the reference equals the DPO loss of the merged
  model against the base, differentiated through the merge; the base is untouched and the
  optimizer holds state for the adapters only;
- the target regex and the config are checked with messages that say what to change.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import lora, models, train
from rlhf_jax.sampling import generate

CONFIGS = {
    "gpt2": models.get_config("tiny", vocab_size=48, max_len=16, d_model=32, n_layers=2, n_heads=4),
    "llama": models.get_config("llama-tiny", vocab_size=48, max_len=16, n_layers=2),
    "gemma2": models.get_config("gemma2-tiny", vocab_size=48, max_len=16, n_layers=2),
}
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _setup(family, seed=0):
    cfg = CONFIGS[family]
    base = models.init_params(cfg, jax.random.key(seed))
    adapters = lora.init_adapters(base, LORA, jax.random.key(seed + 1))
    return cfg, base, adapters


def _randomize_b(adapters, seed=2, std=0.05):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def _tokens(cfg, b=3, t=12, seed=5):
    return jax.random.randint(jax.random.key(seed), (b, t), 2, cfg.vocab_size)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fresh_adapters_leave_the_model_exactly_unchanged(family):
    cfg, base, adapters = _setup(family)
    tokens = _tokens(cfg)
    want = models.Transformer(cfg).apply({"params": base}, tokens)
    model = lora.LoraTransformer(cfg, LORA)
    got = model.apply({"params": {"base": base, "lora": adapters}}, tokens)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(model.apply({"params": {"base": base}}, tokens), want)
    # Every attention and MLP projection of every layer has an adapter, head-aligned.
    q = adapters["layers_1"]["attn"]["q"]
    assert q["a"].shape == (cfg.d_model, 4) and q["b"].shape == (4, cfg.n_heads, cfg.head_dim)
    o = adapters["layers_0"]["attn"]["o"]
    assert o["a"].shape == (cfg.n_heads, cfg.head_dim, 4) and o["b"].shape == (4, cfg.d_model)
    mlp = {"gate", "up", "down"} if cfg.mlp == "gated" else {"up", "down"}
    assert set(adapters["layers_0"]["mlp"]) == mlp
    bound = 1 / np.sqrt(cfg.d_model)
    assert 0.5 * bound < float(jnp.abs(q["a"]).max()) <= bound and not np.any(q["b"])


@pytest.mark.parametrize("family", ["llama"])
def test_adapted_forward_and_decoding_equal_the_merged_model(family):
    cfg, base, adapters = _setup(family)
    adapters = _randomize_b(adapters)
    merged = lora.merge(base, adapters, LORA)
    # The merge by hand for one kernel: W + (alpha / r) * A @ B over the flattened axes.
    a, b = adapters["layers_0"]["attn"]["o"]["a"], adapters["layers_0"]["attn"]["o"]["b"]
    w = base["layers_0"]["attn"]["o"]["kernel"]
    by_hand = np.asarray(w) + 2.0 * (np.asarray(a).reshape(-1, 4) @ np.asarray(b)).reshape(w.shape)
    np.testing.assert_allclose(merged["layers_0"]["attn"]["o"]["kernel"], by_hand, atol=1e-6)
    np.testing.assert_array_equal(merged["embed"]["embedding"], base["embed"]["embedding"])

    tokens = _tokens(cfg)
    plain = models.Transformer(cfg)
    model = lora.LoraTransformer(cfg, LORA)
    lora_params = {"base": base, "lora": adapters}
    want = plain.apply({"params": merged}, tokens)
    got = model.apply({"params": lora_params}, tokens)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert float(jnp.abs(want - plain.apply({"params": base}, tokens)).max()) > 1e-2  # B moved it

    prompts, mask = tokens[:, :5], jnp.ones((3, 5), jnp.int32)
    kw = dict(max_new_tokens=6, temperature=0.0)
    ours = generate(model, lora_params, prompts, mask, jax.random.key(0), **kw)
    ref = generate(plain, merged, prompts, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(ours.tokens, ref.tokens)


def test_adapter_gradients_match_finite_differences():
    cfg, base, adapters = _setup("llama")
    adapters = _randomize_b(adapters)
    model = lora.LoraTransformer(cfg, LORA)
    tokens = _tokens(cfg)
    weights = jax.random.normal(jax.random.key(9), (3, 12, cfg.vocab_size)) / 100

    @jax.jit
    def f(ad):
        logits = model.apply({"params": {"base": base, "lora": ad}}, tokens)
        return jnp.sum(jax.nn.log_softmax(logits) * weights)

    grads = jax.grad(f)(adapters)
    leaves, tree = jax.tree.flatten(adapters)
    eps = 1e-2
    for i in range(3):  # three random directions over every adapter at once
        keys = jax.random.split(jax.random.key(100 + i), len(leaves))
        v = [jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        norm = np.sqrt(sum(float(jnp.sum(d * d)) for d in v))
        v = jax.tree.unflatten(tree, [d / norm for d in v])  # a unit direction
        plus = f(jax.tree.map(lambda x, d: x + eps * d, adapters, v))
        minus = f(jax.tree.map(lambda x, d: x - eps * d, adapters, v))
        numeric = (float(plus) - float(minus)) / (2 * eps)
        analytic = sum(
            float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v))
        )
        assert numeric == pytest.approx(analytic, rel=1e-2, abs=1e-3), (i, numeric, analytic)
    # Both factors get gradients (B != 0 here, so A's gradient is not zero).
    q = grads["layers_0"]["attn"]["q"]
    assert float(jnp.abs(q["a"]).max()) > 0 and float(jnp.abs(q["b"]).max()) > 0


def _preference_batch(cfg, b=4, t=12, seed=3):
    rng = np.random.default_rng(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(2, cfg.vocab_size, (b, t)).astype(np.int32)
        attn = np.ones((b, t), np.int32)
        loss = np.zeros((b, t), np.int32)
        for i in range(b):
            n = int(rng.integers(3, t - 4))
            attn[i, 4 + n :] = 0
            tokens[i, 4 + n :] = 0
            loss[i, 4 : 4 + n] = 1
        tokens[:, :4] = batch.get("chosen_tokens", tokens)[:, :4]  # one prompt per pair
        batch.update({f"{side}_tokens": tokens, f"{side}_attention_mask": attn})
        batch[f"{side}_loss_mask"] = loss
    return batch


def test_lora_dpo_step_trains_only_the_adapters_against_the_base():
    cfg, base, adapters = _setup("llama")
    adapters = _randomize_b(adapters)
    batch = jax.tree.map(jnp.asarray, _preference_batch(cfg))
    tx = optax.sgd(0.5)
    step = train.make_step(lora.lora_loss(train.make_dpo_loss(lora.LoraTransformer(cfg, LORA))), tx)
    state = train.create_train_state(adapters, tx, 0, frozen={"base": base}, hparams={"beta": 0.1})
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
    new, metrics = jax.jit(step)(state, batch)

    # Independent: the DPO loss of the merged model against the base as the reference, the
    # gradient taken through the merge (dense kernels, not the low-rank forward).
    plain_loss = train.make_dpo_loss(models.Transformer(cfg))

    def merged_loss(ad):
        merged = lora.merge(base, ad, LORA)
        return plain_loss(merged, batch, frozen=base, hparams={"beta": jnp.float32(0.1)})

    (want_loss, want_metrics), grads = jax.jit(jax.value_and_grad(merged_loss, has_aux=True))(
        adapters
    )
    assert float(metrics["loss"]) == pytest.approx(float(want_loss), rel=1e-5)
    assert float(metrics["rewards/margin"]) == pytest.approx(
        float(want_metrics["rewards/margin"]), abs=1e-5
    )
    for after, before, g in zip(
        jax.tree.leaves(new.params), jax.tree.leaves(adapters), jax.tree.leaves(grads)
    ):
        np.testing.assert_allclose(after - before, -0.5 * np.asarray(g), atol=2e-6)
    assert float(jnp.abs(grads["layers_1"]["mlp"]["down"]["b"]).max()) > 0
    for x, y in zip(jax.tree.leaves(new.frozen["base"]), jax.tree.leaves(base)):
        np.testing.assert_array_equal(x, y)  # the base is frozen
    assert set(new.frozen) == {"base"}  # one copy of the base: it is also the reference
    # The same step with a separate frozen copy of the base as the reference: identical.
    copy = {"base": base, "ref": {"base": jax.tree.map(jnp.copy, base)}}
    two, metrics2 = jax.jit(step)(state.replace(frozen=copy), batch)
    assert float(metrics2["loss"]) == float(metrics["loss"])
    for a, b in zip(jax.tree.leaves(two.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_targets_and_config_are_checked_with_the_fix():
    cfg, base, _ = _setup("llama")
    only_q = lora.LoraConfig(rank=2, targets=r"attn/q$")
    adapters = lora.init_adapters(base, only_q, jax.random.key(0))
    assert {tuple(sorted(adapters[k]["attn"])) for k in adapters} == {("q",)}
    assert all("mlp" not in adapters[k] for k in adapters)
    with pytest.raises(ValueError, match="match no projection; paths look like layers_0/attn/"):
        lora.init_adapters(base, lora.LoraConfig(targets="attention/query"), jax.random.key(0))
    with pytest.raises(ValueError, match="not a regular expression"):
        lora.LoraConfig(targets="attn/(q")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        lora.LoraConfig(dropout=-0.1)
    loss = lora.lora_loss(train.make_dpo_loss(lora.LoraTransformer(cfg, only_q)))
    with pytest.raises(ValueError, match="state.frozen = {'base'"):
        loss(adapters, _preference_batch(cfg), frozen=base, hparams={"beta": 0.1})


def test_compiled_lora_step_holds_a_fraction_of_the_full_steps_arguments():
    """Full DPO (trained params + AdamW moments + a frozen reference copy) against LoRA DPO
    (adapters + their moments + one base, which is also the reference), from the compiled
    programs' `memory_analysis()`."""
    cfg = models.get_config("llama-tiny", vocab_size=64, max_len=16, n_layers=2)
    base = models.init_params(cfg, jax.random.key(0))
    batch = _preference_batch(cfg)
    tx = optax.adamw(1e-3)
    full_step = train.make_dpo_step(models.Transformer(cfg), tx)
    full = train.create_train_state(
        base, tx, 0, frozen=jax.tree.map(jnp.copy, base), hparams={"beta": 0.1}
    )
    adapters = lora.init_adapters(base, LORA, jax.random.key(1))
    lora_step = train.make_step(
        lora.lora_loss(train.make_dpo_loss(lora.LoraTransformer(cfg, LORA))), tx
    )
    small = train.create_train_state(adapters, tx, 0, frozen={"base": base}, hparams={"beta": 0.1})

    def args_bytes(step, state):
        return jax.jit(step).lower(state, batch).compile().memory_analysis().argument_size_in_bytes

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    full_b, lora_b = args_bytes(full_step, full), args_bytes(lora_step, small)
    p, a, data = nbytes(base), nbytes(adapters), nbytes(batch)
    assert full_b == pytest.approx(4 * p + data, rel=0.02)  # params, two moments, reference
    assert lora_b == pytest.approx(p + 3 * a + data, rel=0.02)  # base, adapters, two moments
    assert lora_b < 0.35 * full_b, (lora_b, full_b)


def _lora_dpo(cfg, seed=0):
    base = models.init_params(cfg, jax.random.key(seed))
    adapters = _randomize_b(lora.init_adapters(base, LORA, jax.random.key(seed + 1)))
    tx = train.make_optimizer(1e-2, eps=1e-3)
    step = train.make_step(lora.lora_loss(train.make_dpo_loss(lora.LoraTransformer(cfg, LORA))), tx)
    state = train.create_train_state(adapters, tx, 0, frozen={"base": base}, hparams={"beta": 0.1})
    return state, step


def test_lora_step_on_a_mesh_equals_one_device():
    from rlhf_jax import sharding

    cfg = models.get_config("llama-tiny", vocab_size=64, max_len=16, n_layers=2)  # 8 heads, 2 kv
    state, step = _lora_dpo(cfg)
    batches = [_preference_batch(cfg, b=8, seed=s) for s in range(3)]
    one = jax.jit(step)
    s1 = jax.tree.map(jnp.copy, state)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    compiled = sharding.compile_step(step, mesh, state, batches[0])
    s8 = sharding.shard_state(jax.tree.map(jnp.copy, state), mesh)
    spec = s8.params["layers_0"]["attn"]["q"]["b"].sharding.spec
    assert tuple(spec)[:2] == (None, "tensor")  # B keeps whole heads per shard
    for batch in batches:
        s1, m1 = one(s1, batch)
        s8, m8 = compiled(s8, batch)
        assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_lora_run_checkpoints_only_the_adapters_and_resumes_bit_exactly(tmp_path):
    from rlhf_jax.run import runner

    cfg = CONFIGS["llama"]
    batches = [_preference_batch(cfg, b=8, seed=s) for s in range(6)]

    def run(workdir, steps):
        state, step = _lora_dpo(cfg)
        return runner.fit(
            step, state, iter(batches), workdir=workdir, steps=steps, checkpoint_every=2,
            log_every=2, progress=False,
        )  # fmt: skip

    straight, _ = run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 4)  # stops after a checkpoint at step 4 ...
    resumed, rows = run(tmp_path / "resumed", 6)  # ... and the rerun continues from it
    assert rows[-1]["step"] == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The checkpoint holds the adapters and their AdamW moments, not the base: Orbax's tree
    # metadata lists every saved leaf.
    import json

    meta = json.loads((tmp_path / "straight/checkpoints/6/state/_METADATA").read_text())
    paths = list(meta["tree_metadata"])
    assert not any("layers_0', 'attn', 'q', 'kernel'" in p for p in paths)  # no base kernel
    assert any(p.startswith("('params', 'layers_0', 'attn', 'q', 'a')") for p in paths)
    assert any("'mu', 'layers_0', 'attn', 'q', 'b'" in p for p in paths)  # AdamW moments
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(straight.params))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(straight.frozen["base"]))
    assert adapter_bytes < base_bytes / 8


def test_critic_free_with_lora_samples_the_adapted_policy_against_the_base():
    """GRPO with the policy as adapters on a frozen base: the rollout samples and scores the
    merged model, the reference log-probs are the base's (adapters off), and the update moves
    the adapters only."""
    from rlhf_jax.data import arithmetic as ar

    cfg = models.get_config("llama-tiny", vocab_size=16, max_len=16, n_layers=2)
    base = models.init_params(cfg, jax.random.key(0))
    adapters = _randomize_b(lora.init_adapters(base, LORA, jax.random.key(1)))
    task = ar.ArithmeticTask(digits=2, noise=0.5)
    prompts, mask = task.prompts(task.problems(4, 0))
    batch = {"prompt_tokens": prompts, "prompt_mask": mask}
    rl = train.CriticFreeConfig(
        algo="grpo", group_size=4, max_new_tokens=task.answer_length, eos_id=ar.EOS,
        pad_id=ar.PAD,
    )  # fmt: skip
    tx = optax.sgd(0.1)
    state = train.create_critic_free_state(adapters, tx, 0, base_params=base, kl_coef=0.1)
    model = lora.LoraTransformer(cfg, LORA)
    _, ro = jax.jit(train.make_critic_free_rollout(model, ar.exact_match_reward, rl))(state, batch)
    merged = lora.merge(base, adapters, LORA)
    plain_state = train.create_critic_free_state(merged, tx, 0, ref_params=base, kl_coef=0.1)
    plain = train.make_critic_free_rollout(models.Transformer(cfg), ar.exact_match_reward, rl)
    _, want = jax.jit(plain)(plain_state, batch)
    np.testing.assert_array_equal(ro.response_tokens, want.response_tokens)
    np.testing.assert_allclose(ro.logps, want.logps, atol=2e-5)
    np.testing.assert_allclose(ro.ref_logps, want.ref_logps, atol=2e-5)
    assert float(jnp.abs(ro.logps - ro.ref_logps).max()) > 1e-3  # the adapters matter
    step = jax.jit(train.make_critic_free_step(model, ar.exact_match_reward, tx, rl))
    new, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["kl"]) > 0
    assert jax.tree.structure(new.params) == jax.tree.structure(adapters)
    assert set(new.frozen) == {"base"}


def test_beta_sweep_over_adapters_is_one_vmapped_program_with_one_base():
    from rlhf_jax import sweeps

    cfg = CONFIGS["llama"]
    state, step = _lora_dpo(cfg)
    states = [state.replace(hparams={"beta": jnp.float32(b)}) for b in (0.1, 1.0)]
    sweep = sweeps.stack_sweep(states)
    assert sweep["members"].frozen is None  # the base is held once, shared by both members
    assert sweep["shared"]["frozen"]["base"] is state.frozen["base"]
    batch = _preference_batch(cfg)
    swept, metrics = jax.jit(sweeps.sweep_step(step))(sweep, batch)
    for i, s in enumerate(states):
        one, m = jax.jit(step)(s, batch)
        assert float(metrics[f"loss/{i}"]) == pytest.approx(float(m["loss"]), rel=1e-5)
        member = sweeps.sweep_member(swept, i)
        for a, b in zip(jax.tree.leaves(member.params), jax.tree.leaves(one.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
