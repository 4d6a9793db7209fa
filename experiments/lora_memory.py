"""Memory of one compiled DPO step: full fine-tuning with a frozen reference copy, against LoRA with
the base as the reference, and QLoRA with an int8 or NF4 base: from the compiled programs'
`memory_analysis()`, with abstract inputs (nothing is allocated).

    .venv/bin/python experiments/lora_memory.py                                  # llama-3.2-1b
    .venv/bin/python experiments/lora_memory.py --models llama-3.2-1b llama-3.1-8b --seq-len 1024
    .venv/bin/python experiments/lora_memory.py --models --logits-from runs/frontier/sft/hf

Per model and variant it prints the argument bytes (parameters, optimizer state, frozen base or
reference, batch), temporaries and outputs of the step compiled for this machine's first device,
with float32 parameters and AdamW (the optimizer state mirrors what trains), remat on the decoder
blocks, LoRA rank --rank on every attention and MLP projection. The arguments are what the
choice of method changes; the temporaries depend on the backend's scheduling (compile for the
target with experiments/plan.py for a per-chip answer).

--logits-from HF_FOLDER measures what quantizing a trained base costs: the logits of the model
with its projections stored int8 / NF4 (dequantized in the forward, adapters at B = 0) against the
float model, on random token rows: max and mean |logit difference| and the mean per-token
KL(float || quantized).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from rlhf_jax import lora, models, train

GB = 1e9


def _batch(b: int, t: int) -> dict:
    shape = jax.ShapeDtypeStruct((b, t), jnp.int32)
    return {f"{side}_{k}": shape for side in ("chosen", "rejected")
            for k in ("tokens", "attention_mask", "loss_mask")}  # fmt: skip


def measure(name: str, *, rank: int, batch: int, seq_len: int) -> list[dict]:
    """Rows {model, variant, params_b, args_gb, temp_gb, out_gb, compile_s} for one model."""
    cfg = models.get_config(name, remat=True, max_len=max(seq_len, 16))
    base = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    tx = train.make_optimizer(1e-5)
    lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank)
    adapters = jax.eval_shape(lambda p: lora.init_adapters(p, lcfg, jax.random.key(1)), base)
    lora_step = train.make_step(
        lora.lora_loss(train.make_dpo_loss(lora.LoraTransformer(cfg, lcfg))), tx
    )
    variants = {
        "full + reference copy": (
            train.make_dpo_step(models.Transformer(cfg), tx),
            lambda: train.create_train_state(
                jax.tree.map(jnp.zeros_like, base), tx, 0,
                frozen=jax.tree.map(jnp.zeros_like, base), hparams={"beta": 0.1},
            ),
        ),
    }  # fmt: skip
    for mode in ("none", "int8", "nf4"):
        label = "LoRA, base = reference" if mode == "none" else f"QLoRA {mode}"

        def make_state(mode=mode):
            zeros = jax.tree.map(jnp.zeros_like, base)
            frozen = zeros if mode == "none" else lora.quantize_base(zeros, mode)
            ad = jax.tree.map(jnp.zeros_like, adapters)
            return train.create_train_state(
                ad, tx, 0, frozen={"base": frozen}, hparams={"beta": 0.1}
            )

        variants[label] = (lora_step, make_state)
    rows = []
    n_params = sum(x.size for x in jax.tree.leaves(base))
    for label, (step, make_state) in variants.items():
        state = jax.eval_shape(make_state)
        start = time.perf_counter()
        jitted = jax.jit(step, donate_argnums=0)  # as the drivers compile it: the state donated
        compiled = jitted.lower(state, _batch(batch, seq_len)).compile()
        mem = compiled.memory_analysis()
        rows.append(
            {
                "model": name, "variant": label, "params_b": n_params / 1e9,
                "args_gb": mem.argument_size_in_bytes / GB,
                "temp_gb": mem.temp_size_in_bytes / GB,
                "out_gb": mem.output_size_in_bytes / GB,
                "compile_s": time.perf_counter() - start,
            }
        )  # fmt: skip
    return rows


def logit_difference(path: str, *, rows: int = 8, seq_len: int = 32) -> list[dict]:
    """Rows {mode, max_abs, mean_abs, kl} of the quantized base against the float one."""
    cfg, params = models.from_pretrained(path)
    tokens = jax.random.randint(jax.random.key(0), (rows, min(seq_len, cfg.max_len)), 0,
                                cfg.vocab_size)  # fmt: skip
    model = models.Transformer(cfg)
    ref = model.apply({"params": params}, tokens)
    out = []
    for mode in ("int8", "nf4"):
        got = model.apply(
            {"params": lora.dequantize_base(lora.quantize_base(params, mode))}, tokens
        )
        p = jax.nn.log_softmax(ref)
        kl = jnp.mean(jnp.sum(jnp.exp(p) * (p - jax.nn.log_softmax(got)), axis=-1))
        diff = jnp.abs(got - ref)
        out.append({"mode": mode, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                    "kl": float(kl), "logit_std": float(ref.std())})  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["llama-3.2-1b"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--logits-from", default=None, help="an HF folder: quantization error")
    args = parser.parse_args(argv)
    if args.logits_from:
        for r in logit_difference(args.logits_from):
            print(
                f"{r['mode']}: max |dlogit| {r['max_abs']:.4f}, mean {r['mean_abs']:.5f} (logit "
                f"std {r['logit_std']:.2f}), mean KL(float || quantized) {r['kl']:.2e} nats/token"
            )
    for name in args.models:
        if name not in models.PRESETS:
            parser.error(f"--models {name}: not a models.PRESETS name")
    if not args.models:
        return []
    print(
        f"DPO step, {args.batch} pairs x {args.seq_len} tokens, float32 params, AdamW, remat, "
        f"LoRA rank {args.rank} on every projection; {jax.devices()[0].platform}"
    )
    print(f"{'model':<14}{'variant':<26}{'args GB':>9}{'temp GB':>9}{'out GB':>8}{'ratio':>7}")
    rows = []
    for name in args.models:
        measured = measure(name, rank=args.rank, batch=args.batch, seq_len=args.seq_len)
        full = measured[0]["args_gb"]
        for r in measured:
            print(
                f"{r['model']:<14}{r['variant']:<26}{r['args_gb']:>9.2f}{r['temp_gb']:>9.2f}"
                f"{r['out_gb']:>8.2f}{r['args_gb'] / full:>7.2f}"
            )
        rows += measured
    return rows


if __name__ == "__main__":
    main()
