"""`TransformerConfig.scan_layers`: the decoder blocks as one `lax.scan` over the layers,
against the unrolled decoder (the independent reference: one Python call per layer).

- every family's logits and gradients, with each remat policy, equal the unrolled model's,
  including Gemma 2's sliding/global pairs, a Gemma 3-like 2:1 pattern with two RoPE tables
  and bf16 compute (weights stacked in bf16);
- the layer period is the smallest repeating pattern of windows and RoPE tables;
- LoRA adapters (and a QLoRA int8 base) scan with the layers; adapters on some layers only are
  refused with the fix named; LoRA dropout draws masks from the step's key;
- the reward and value models scan their trunk;
- a DPO step on an 8-device mesh with scanned layers equals the unrolled step on one device;
- the compiled program holds one block: its size does not grow with depth.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import lora, models, train
from rlhf_jax import sharding as sh
from rlhf_jax.models import transformer

SMALL = dict(vocab_size=64, max_len=32, d_model=32, n_heads=4, d_ff=64)
CONFIGS = {
    "gpt2": models.get_config("tiny", n_layers=3, **SMALL),
    "llama": models.get_config("llama-tiny", n_layers=3, vocab_size=64, max_len=32),
    "gemma2": models.get_config("gemma2-tiny", n_layers=4, vocab_size=64, max_len=32),
    "pythia": models.get_config("pythia-2.8b", n_layers=2, **SMALL),
    # bf16 compute: the projections' weights are stacked (and their gradients accumulated) in
    # bf16, which is what the unrolled blocks compute with.
    "llama_bf16": models.get_config("llama-tiny", n_layers=3, vocab_size=64, max_len=32,
                                    dtype="bfloat16"),
    # Gemma 3-like: two sliding layers then a global one, sliding layers on their own RoPE base.
    "gemma3_like": models.get_config(
        "gemma2-tiny", n_layers=6, vocab_size=64, max_len=32, rope_local_theta=100.0,
        layer_types=(("sliding_attention",) * 2 + ("full_attention",)) * 2,
    ),
}  # fmt: skip


def _params(cfg, seed=0):
    params = models.init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    # Non-trivial norm scales and biases, so that a layer run with another's weights shows.
    return jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def _batch(cfg, b=2, t=13, seed=3):
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[0, :4] = 0  # left padding
    return tokens, mask


def _loss(model, tokens, mask):
    def loss(variables):
        logits = model.apply(variables, tokens, mask)
        return jnp.mean(jnp.tanh(logits) * mask[..., None]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _assert_close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


# Every family once, each remat policy on some of them (keeps the test short).
CASES = [("gpt2", "none"), ("llama", "dots"), ("gemma2", "full"), ("pythia", "none"),
         ("llama_bf16", "full"), ("gemma3_like", "none")]  # fmt: skip


@pytest.mark.parametrize("family,remat", CASES)
def test_scanned_layers_equal_the_unrolled_decoder(family, remat):
    cfg = dataclasses.replace(CONFIGS[family], remat=remat)
    params = _params(cfg)
    tokens, mask = _batch(cfg)
    (la, logits_a), ga = _loss(models.Transformer(cfg), tokens, mask)({"params": params})
    scanned = dataclasses.replace(cfg, scan_layers=True)
    (lb, logits_b), gb = _loss(models.Transformer(scanned), tokens, mask)({"params": params})
    np.testing.assert_allclose(logits_b, logits_a, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    _assert_close(gb, ga)
    # The scanned program is a loop over the layer groups.
    text = jax.jit(models.Transformer(scanned).apply).lower({"params": params}, tokens, mask)
    assert "while" in text.as_text()


def test_layer_period_is_the_smallest_repeating_pattern():
    def by_hand(cfg):  # the first p whose pattern, repeated, is the whole stack
        kinds = [(cfg.window(i), cfg.rope_key(i)) for i in range(cfg.n_layers)]
        for p in range(1, cfg.n_layers + 1):
            if cfg.n_layers % p == 0 and kinds == kinds[:p] * (cfg.n_layers // p):
                return p

    want = {"gpt2": 1, "llama": 1, "gemma2": 2, "pythia": 1, "llama_bf16": 1, "gemma3_like": 3}
    for name, cfg in CONFIGS.items():
        assert transformer.layer_period(cfg) == by_hand(cfg) == want[name], name
    for name in ("gemma-2-9b", "llama-3.1-8b", "mistral-7b"):
        cfg = models.get_config(name)
        assert transformer.layer_period(cfg) == by_hand(cfg)
    assert transformer.layer_period(models.get_config("gemma-2-9b")) == 2
    # No repeat short of the whole stack: one group of every layer (still exact).
    odd = models.get_config("gemma2-tiny", n_layers=3, layer_types=(
        "sliding_attention", "full_attention", "full_attention"))  # fmt: skip
    assert transformer.layer_period(odd) == 3


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_lora_adapters_and_a_quantized_base_scan_with_the_layers(quantize):
    cfg = CONFIGS["llama"]
    cfg_lora = lora.LoraConfig(rank=4, alpha=8.0)
    base = _params(cfg)
    adapters = lora.init_adapters(base, cfg_lora, jax.random.key(7))
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B != 0: the adapters count
    if quantize != "none":
        base = lora.quantize_base(base, quantize)
    tokens, mask = _batch(cfg)
    runs = []
    for scan in (False, True):
        model = lora.LoraTransformer(dataclasses.replace(cfg, scan_layers=scan), cfg_lora)

        def loss(adapters, model=model):
            logits = model.apply({"params": lora.view(adapters, base)}, tokens, mask)
            return jnp.mean(jnp.tanh(logits) * mask[..., None])

        runs.append(jax.jit(jax.value_and_grad(loss))(adapters))
    (la, ga), (lb, gb) = runs
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    _assert_close(gb, ga)
    assert float(jnp.abs(jax.tree.leaves(gb)[0]).max()) > 0


def test_adapters_on_some_layers_only_are_refused_with_the_fix():
    cfg = dataclasses.replace(CONFIGS["llama"], scan_layers=True)
    cfg_lora = lora.LoraConfig(rank=4, alpha=8.0)
    base = _params(cfg)
    adapters = lora.init_adapters(base, cfg_lora, jax.random.key(7))
    del adapters["layers_1"]["mlp"]
    tokens, mask = _batch(cfg)
    model = lora.LoraTransformer(cfg, cfg_lora)
    with pytest.raises(ValueError, match="layers_1 differ .* set scan_layers=False"):
        model.apply({"params": lora.view(adapters, base)}, tokens, mask)


def test_lora_dropout_draws_a_mask_per_layer_under_scan():
    """Dropout under scan: the same key gives the same output, another key another one, and
    both differ from no dropout."""
    cfg = dataclasses.replace(CONFIGS["llama"], n_layers=2)
    cfg_lora = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    base = _params(cfg)
    adapters = jax.tree.map(
        lambda x: x + 0.05, lora.init_adapters(base, cfg_lora, jax.random.key(7))
    )
    tokens, mask = _batch(cfg)
    key = jax.random.key(11)
    scanned = lora.LoraTransformer(dataclasses.replace(cfg, scan_layers=True), cfg_lora)
    got = scanned.apply({"params": lora.view(adapters, base, key)}, tokens, mask)
    again = scanned.apply({"params": lora.view(adapters, base, key)}, tokens, mask)
    np.testing.assert_array_equal(got, again)
    no_dropout = scanned.apply({"params": lora.view(adapters, base)}, tokens, mask)
    assert float(jnp.abs(got - no_dropout).max()) > 1e-4
    other = scanned.apply({"params": lora.view(adapters, base, jax.random.key(12))}, tokens, mask)
    assert float(jnp.abs(got - other).max()) > 1e-4


def _preference_batch(cfg, b=8, t=12, seed=0):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, cfg.vocab_size, (b, 5))
    out = {}
    for name in ("chosen", "rejected"):
        tokens = np.concatenate([prompt, rng.integers(1, cfg.vocab_size, (b, t - 5))], axis=1)
        out[f"{name}_tokens"] = tokens.astype(np.int32)
        out[f"{name}_attention_mask"] = np.ones((b, t), np.int32)
        loss_mask = np.zeros((b, t), np.int32)
        loss_mask[:, 5:] = 1
        out[f"{name}_loss_mask"] = loss_mask
    return out


def test_scanned_dpo_step_on_a_mesh_equals_the_unrolled_step_on_one_device():
    cfg = dataclasses.replace(CONFIGS["gemma2"], remat="full", logits_chunk=4)
    params = _params(cfg)
    tx = optax.sgd(0.5)  # updates linear in the gradients (AdamW would magnify round-off)
    states, steps = [], []
    for scan in (False, True):
        model = models.Transformer(dataclasses.replace(cfg, scan_layers=scan))
        steps.append(train.make_step(train.make_dpo_loss(model), tx))
        states.append(train.create_train_state(params, tx, 0, frozen=params,
                                               hparams={"beta": 0.1}))  # fmt: skip
    batches = [_preference_batch(cfg, seed=s) for s in range(2)]
    mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
    one, s1 = jax.jit(steps[0]), states[0]
    compiled = sh.compile_step(steps[1], mesh, states[1], batches[0])
    s8 = sh.shard_state(states[1], mesh)
    for batch in batches:
        s1, m1 = one(s1, batch)
        s8, m8 = compiled(s8, batch)
        assert float(m8["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-5)
    _assert_close(s8.params, s1.params, atol=1e-5)


def test_the_scanned_program_does_not_grow_with_depth():
    def size(n_layers, scan):
        cfg = models.get_config("llama-tiny", n_layers=n_layers, vocab_size=64, max_len=32,
                                remat="full", scan_layers=scan)  # fmt: skip
        params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
        tokens, mask = _batch(cfg)

        def loss(p):
            return jnp.mean(models.Transformer(cfg).apply({"params": p}, tokens, mask))

        return len(jax.jit(jax.grad(loss)).lower(params).as_text())

    unrolled = size(8, False) - size(2, False)
    scanned = size(8, True) - size(2, True)
    # Unrolled: six more blocks, forward and backward. Scanned: six more stacked leaves only.
    assert scanned < 0.25 * unrolled, (scanned, unrolled)


@pytest.mark.parametrize("kind", ["reward", "value"])
def test_reward_and_value_models_scan_their_trunk(kind):
    cfg = CONFIGS["llama"]
    model_cls, init = {
        "reward": (models.RewardModel, models.init_reward_params),
        "value": (models.ValueModel, models.init_value_params),
    }[kind]
    params = init(cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)  # the value head starts at zero: move it
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    tokens, mask = _batch(cfg)
    runs = []
    for scan in (False, True):
        model = model_cls(dataclasses.replace(cfg, scan_layers=scan))

        def loss(p, model=model):
            out = model.apply({"params": p}, tokens, mask)
            return jnp.sum(jnp.tanh(out)), out

        runs.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(params))
    ((la, out_a), ga), ((lb, out_b), gb) = runs
    np.testing.assert_allclose(out_b, out_a, atol=1e-5, rtol=1e-5)
    _assert_close(gb, ga)
    trunk = gb["transformer"]["layers_1"]["mlp"]["down"]["kernel"]
    assert float(jnp.abs(trunk).max()) > 0
