"""The Hugging Face tensor map of every family: one `Entry` per HF tensor (its name, the
parameter paths it maps onto, and the reshape each way), shared by checkpoint load and save
(`models.hf`) and by PEFT adapters (`lora.peft`).

- Linear weights are [out, in] in PyTorch; our kernels are [in..., out...] with the head axis
  kept (q/k/v [D, heads, Dh], o [H, Dh, D]): a transpose and a reshape.
- GPT-2's Conv1D weights are already [in, out]; its fused `c_attn` is split into q, k, v.
- GPT-NeoX's fused `query_key_value` is per head ([H, 3, Dh] rows): split per head.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from rlhf_jax.models.config import TransformerConfig


class Entry(NamedTuple):
    hf: str  # HF tensor name
    ours: tuple[str, ...]  # '/'-joined parameter paths it maps onto (one, or q/k/v)
    split: Callable[[np.ndarray, list[tuple]], list[np.ndarray]]  # HF -> ours (target shapes)
    join: Callable[[list[np.ndarray]], np.ndarray]  # ours -> HF


def _same() -> tuple:
    return (lambda a, shapes: [a.reshape(shapes[0])], lambda xs: xs[0])


def _vector() -> tuple:
    return (lambda a, shapes: [a.reshape(shapes[0])], lambda xs: xs[0].reshape(-1))


def _linear(n_in: int = 1) -> tuple:  # torch Linear [out, in]
    return (
        lambda a, shapes: [a.T.reshape(shapes[0])],
        lambda xs: xs[0].reshape(math.prod(xs[0].shape[:n_in]), -1).T,
    )


def _conv1d(n_in: int = 1) -> tuple:  # GPT-2 Conv1D [in, out]
    return (
        lambda a, shapes: [a.reshape(shapes[0])],
        lambda xs: xs[0].reshape(math.prod(xs[0].shape[:n_in]), -1),
    )


def _gpt2_qkv(weight: bool) -> tuple:
    axis = 1 if weight else 0

    def split(a, shapes):
        return [x.reshape(s) for x, s in zip(np.split(a, 3, axis=axis), shapes)]

    def join(xs):
        flat = [x.reshape(x.shape[0], -1) if weight else x.reshape(-1) for x in xs]
        return np.concatenate(flat, axis=axis)

    return split, join


def _neox_qkv(cfg: TransformerConfig, weight: bool) -> tuple:
    h, dh = cfg.n_heads, cfg.head_dim

    def split(a, shapes):
        if weight:  # [H * 3 * Dh, D] -> three [D, H, Dh]
            a = a.reshape(h, 3, dh, -1)
            return [a[:, j].transpose(2, 0, 1) for j in range(3)]
        return [a.reshape(h, 3, dh)[:, j] for j in range(3)]

    def join(xs):
        if weight:
            return np.stack([x.transpose(1, 2, 0) for x in xs], axis=1).reshape(3 * h * dh, -1)
        return np.stack(xs, axis=1).reshape(-1)

    return split, join


def _e(hf: str, ours: str | tuple[str, ...], kind: tuple) -> Entry:
    return Entry(hf, (ours,) if isinstance(ours, str) else ours, *kind)


def _norm_entries(cfg: TransformerConfig, hf: str, ours: str) -> list[Entry]:
    out = [_e(f"{hf}.weight", f"{ours}/scale", _vector())]
    if cfg.norm == "layernorm":
        out.append(_e(f"{hf}.bias", f"{ours}/bias", _vector()))
    return out


def _gpt2_entries(cfg: TransformerConfig) -> list[Entry]:
    out = [
        _e("transformer.wte.weight", "embed/embedding", _same()),
        _e("transformer.wpe.weight", "pos_embed/embedding", _same()),
    ]
    for i in range(cfg.n_layers):
        p, o = f"transformer.h.{i}.", f"layers_{i}/"
        qkv = tuple(f"{o}attn/{x}" for x in "qkv")
        out += _norm_entries(cfg, p + "ln_1", o + "attn_norm")
        out += [
            _e(p + "attn.c_attn.weight", tuple(f"{x}/kernel" for x in qkv), _gpt2_qkv(True)),
            _e(p + "attn.c_attn.bias", tuple(f"{x}/bias" for x in qkv), _gpt2_qkv(False)),
            _e(p + "attn.c_proj.weight", o + "attn/o/kernel", _conv1d(2)),
            _e(p + "attn.c_proj.bias", o + "attn/o/bias", _vector()),
            _e(p + "mlp.c_fc.weight", o + "mlp/up/kernel", _conv1d()),
            _e(p + "mlp.c_fc.bias", o + "mlp/up/bias", _vector()),
            _e(p + "mlp.c_proj.weight", o + "mlp/down/kernel", _conv1d()),
            _e(p + "mlp.c_proj.bias", o + "mlp/down/bias", _vector()),
        ]
        out += _norm_entries(cfg, p + "ln_2", o + "mlp_norm")
    return out + _norm_entries(cfg, "transformer.ln_f", "final_norm")


def _linear_entries(hf: str, ours: str, *, bias: bool, n_in: int = 1) -> list[Entry]:
    """A torch Linear `hf` (weight [out, in], optional bias) onto our `ours/kernel`, `ours/bias`."""
    out = [_e(f"{hf}.weight", f"{ours}/kernel", _linear(n_in))]
    if bias:
        out.append(_e(f"{hf}.bias", f"{ours}/bias", _vector()))
    return out


def _output_entries(cfg: TransformerConfig, final_norm: str, head: str) -> list[Entry]:
    out = _norm_entries(cfg, final_norm, "final_norm")
    return out if cfg.tie_embeddings else out + [_e(f"{head}.weight", "lm_head/kernel", _linear())]


def _neox_entries(cfg: TransformerConfig) -> list[Entry]:
    out = [_e("gpt_neox.embed_in.weight", "embed/embedding", _same())]
    for i in range(cfg.n_layers):
        p, o = f"gpt_neox.layers.{i}.", f"layers_{i}/"
        qkv = tuple(f"{o}attn/{x}" for x in "qkv")
        out += _norm_entries(cfg, p + "input_layernorm", o + "attn_norm")
        out += _norm_entries(cfg, p + "post_attention_layernorm", o + "mlp_norm")
        qkv_w = p + "attention.query_key_value.weight"
        out.append(_e(qkv_w, tuple(f"{x}/kernel" for x in qkv), _neox_qkv(cfg, True)))
        if cfg.qkv_bias:
            qkv_b = p + "attention.query_key_value.bias"
            out.append(_e(qkv_b, tuple(f"{x}/bias" for x in qkv), _neox_qkv(cfg, False)))
        out += _linear_entries(p + "attention.dense", o + "attn/o", bias=cfg.out_bias, n_in=2)
        out += _linear_entries(p + "mlp.dense_h_to_4h", o + "mlp/up", bias=True)
        out += _linear_entries(p + "mlp.dense_4h_to_h", o + "mlp/down", bias=True)
    return out + _output_entries(cfg, "gpt_neox.final_layer_norm", "embed_out")


def _decoder_entries(cfg: TransformerConfig) -> list[Entry]:
    out = [_e("model.embed_tokens.weight", "embed/embedding", _same())]
    for i in range(cfg.n_layers):
        p, o = f"model.layers.{i}.", f"layers_{i}/"
        out += _norm_entries(cfg, p + "input_layernorm", o + "attn_norm")
        for x in "qkv":
            out += _linear_entries(f"{p}self_attn.{x}_proj", f"{o}attn/{x}", bias=cfg.qkv_bias)
        out += _linear_entries(p + "self_attn.o_proj", o + "attn/o", bias=cfg.out_bias, n_in=2)
        if cfg.qk_norm:
            out += _norm_entries(cfg, p + "self_attn.q_norm", o + "attn/q_norm")
            out += _norm_entries(cfg, p + "self_attn.k_norm", o + "attn/k_norm")
        if cfg.post_norms:  # Gemma: post_attention_layernorm is the attention OUTPUT's norm
            out += _norm_entries(cfg, p + "post_attention_layernorm", o + "attn_post_norm")
            out += _norm_entries(cfg, p + "pre_feedforward_layernorm", o + "mlp_norm")
            out += _norm_entries(cfg, p + "post_feedforward_layernorm", o + "mlp_post_norm")
        else:
            out += _norm_entries(cfg, p + "post_attention_layernorm", o + "mlp_norm")
        for x in ("gate", "up", "down"):
            out += _linear_entries(f"{p}mlp.{x}_proj", f"{o}mlp/{x}", bias=cfg.mlp_bias)
    return out + _output_entries(cfg, "model.norm", "lm_head")


def entries(cfg: TransformerConfig) -> list[Entry]:
    if cfg.family == "gpt2":
        return _gpt2_entries(cfg)
    if cfg.family == "gpt_neox":
        return _neox_entries(cfg)
    return _decoder_entries(cfg)


def ignored(name: str) -> bool:
    """Buffers some checkpoints carry (causal masks, RoPE tables) and tied output layers."""
    return name.endswith(
        (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", ".attention.bias",
         ".attention.masked_bias")
    )  # fmt: skip
