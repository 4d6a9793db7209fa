"""QLoRA: the base stored int8 (per output channel) or NF4 (blocks of 64), dequantized inside
the forward, LoRA trained on top (`models.quant`, `lora.quantize_base`).

- int8 and NF4 against NumPy references written here (absmax rounding; the nearest of the 16 NF4
  levels, packed two per byte);
- the QLoRA forward with B = 0 is exactly the plain model on the dequantized kernels, and close
  to the unquantized base (int8 closer than NF4);
- a QLoRA DPO step equals the DPO loss of the merged dequantized model, and its compiled
  arguments are smaller than LoRA's on a float base.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import lora, models, train
from rlhf_jax.models import quant

CFG = models.get_config("llama-tiny", vocab_size=64, max_len=16, n_layers=2)
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def test_int8_against_numpy():
    w = np.random.default_rng(0).normal(size=(8, 4, 16)).astype(np.float32)  # [D, H, Dh]
    q = quant.quantize_kernel(w, "int8", n_in=1)
    scale = np.abs(w).max(axis=0) / 127  # per output channel [H, Dh]
    codes = np.clip(np.round(w / scale), -127, 127)
    np.testing.assert_array_equal(np.asarray(q["kernel_int8"]), codes.astype(np.int8))
    np.testing.assert_allclose(q["kernel_scale"], scale, rtol=1e-6)
    back = np.asarray(quant.dequantize_kernel(q))
    assert np.all(np.abs(back - w) <= scale / 2 + 1e-6)
    assert quant.kernel_shape(q) == w.shape


def test_nf4_against_numpy():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(32, 6)).astype(np.float32) * rng.uniform(0.1, 2, size=(1, 6))
    w[0, :] = 0.0  # exact zeros stay zero
    q = quant.quantize_kernel(w, "nf4")
    assert q["kernel_nf4"].dtype == np.uint8 and q["kernel_nf4"].shape == (32, 3)
    flat = w.reshape(-1, 64)
    want = np.zeros_like(flat)
    for b, block in enumerate(flat):
        m = np.abs(block).max()
        for i, x in enumerate(block):
            level = min(quant.NF4_LEVELS, key=lambda v: abs(x / m - v))
            want[b, i] = level * m
    np.testing.assert_allclose(
        np.asarray(quant.dequantize_kernel(q)), want.reshape(w.shape), atol=1e-6
    )
    with pytest.raises(ValueError, match="divisible by 64"):
        quant.quantize_kernel(np.ones((3, 5), np.float32), "nf4")


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qlora_forward_is_the_dequantized_model(mode):
    base = models.init_params(CFG, jax.random.key(0))
    adapters = lora.init_adapters(base, LORA, jax.random.key(1))
    qbase = lora.quantize_base(base, mode)
    assert "kernel" not in qbase["layers_0"]["attn"]["q"]
    assert qbase["embed"]["embedding"] is base["embed"]["embedding"]  # not quantized, not copied
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
    model = lora.LoraTransformer(CFG, LORA)
    got = model.apply({"params": {"base": qbase, "lora": adapters}}, tokens)
    deq = lora.dequantize_base(qbase)
    want = models.Transformer(CFG).apply({"params": deq}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-6)
    full = models.Transformer(CFG).apply({"params": base}, tokens)
    diff = float(jnp.abs(got - full).max())
    assert 0 < diff < (0.01 if mode == "int8" else 0.1), diff


def test_qlora_dpo_step_and_its_smaller_arguments():
    base = models.init_params(CFG, jax.random.key(0))
    adapters = lora.init_adapters(base, LORA, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)
    rng = np.random.default_rng(3)
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_tokens"] = jnp.asarray(rng.integers(2, 64, (4, 12)), jnp.int32)
        batch[f"{side}_attention_mask"] = jnp.ones((4, 12), jnp.int32)
        batch[f"{side}_loss_mask"] = jnp.asarray(np.r_[[0] * 4 + [1] * 8][None].repeat(4, 0))
    tx = optax.sgd(0.1)
    step = train.make_step(lora.lora_loss(train.make_dpo_loss(lora.LoraTransformer(CFG, LORA))), tx)
    sizes = {}
    for mode in ("none", "int8", "nf4"):
        b = base if mode == "none" else lora.quantize_base(base, mode)
        state = train.create_train_state(adapters, tx, 0, frozen={"base": b}, hparams={"beta": 0.1})
        compiled = jax.jit(step).lower(state, batch).compile()
        sizes[mode] = compiled.memory_analysis().argument_size_in_bytes
        _, metrics = compiled(state, batch)
        deq = lora.dequantize_base(b)
        plain = train.make_dpo_loss(models.Transformer(CFG))
        want, _ = plain(
            lora.merge(deq, adapters, LORA), batch, frozen=deq, hparams={"beta": jnp.float32(0.1)}
        )
        assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-5), mode
    assert sizes["nf4"] < sizes["int8"] < sizes["none"], sizes
