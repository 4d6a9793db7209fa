"""Attention of the decoder: grouped-query attention of a full pass or a prefill chunk
(`attention`, XLA ops), cuDNN's fused flash kernel (`cudnn_attention`), one query per row against
the KV cache (`decode_attention`) and the `Attention` module (q/k/v/o projections, q/k norms, RoPE,
the cache update).

Scores `q·k * scale` (soft-capped when `attn_softcap`), masked, softmax in float32;
`config.attention = "cudnn"` selects the fused kernel for full forward passes of layers without a
sliding window or soft-cap on NVIDIA GPUs (bfloat16), for unpadded and right-padded batches
(others fall back to XLA at run time, see `cudnn_attention`).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.layers import RMSNorm, apply_rope, dense, residual_std, softcapped

NEG = -0.7 * float(np.finfo(np.float32).max)  # masked scores (as jax.nn.dot_product_attention)


def attention(q, k, v, mask, scale, softcap=None):
    """Grouped-query attention of a full pass or a prefill chunk, XLA ops.

    q [B, T, H, Dh]; k, v [B, S, K, Dh] with H a multiple of K; mask [B or 1, 1, T, S] bool, or
    None for causal attention (T == S) -> [B, T, H, Dh]. The numbers of
    `jax.nn.dot_product_attention`'s XLA path (float32 scores and softmax), plus the soft-cap.
    """
    b, t, h, dh = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = softcapped(scores * jnp.float32(scale), softcap)  # [B, K, G, T, S]
    if mask is None:
        mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None, None]
    scores = jnp.where(mask[:, :, None], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return y.reshape(b, t, h, dh)


class Padding(NamedTuple):
    """The padding of a full forward pass, for the cuDNN path: the XLA mask, each row's number
    of real tokens and whether every row is right-padded (its real tokens first)."""

    mask: Array  # [B, 1, T, T] bool
    lengths: Array  # [B] int32
    right_padded: Array  # [] bool


def padding(attention_mask: Array, mask: Array) -> Padding:
    ok = attention_mask.astype(bool)  # [B, T]
    lengths = ok.sum(axis=-1, dtype=jnp.int32)  # [B]
    right_padded = jnp.all(ok == (jnp.arange(ok.shape[1])[None, :] < lengths[:, None]))
    return Padding(mask, lengths, right_padded)


def cudnn_attention(q, k, v, padding: Padding | None, scale: float):
    """Causal attention through cuDNN's fused flash kernel, [B, T, H, Dh] in and out.

    Padding goes in as sequence lengths, never as a bias: cuDNN (through JAX) has no gradient for
    a per-row bias (jax-ml/jax#30593). Lengths describe right-padded rows only, so a batch with
    any other padding (left-padded prompts, say) takes XLA's implementation with the full mask
    instead: `lax.cond` picks per call, on device, and both give the same real-token outputs.
    """

    def fused(lengths=None):
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, implementation="cudnn",
        )  # fmt: skip

    if padding is None:
        return fused()
    return jax.lax.cond(
        padding.right_padded,
        lambda: fused(padding.lengths),
        lambda: attention(q, k, v, padding.mask, scale),
    )


def _pairwise_sum(x, axis):
    """Sum over `axis` by halving it while its length is even (then a plain sum of the rest).

    Elementwise adds of two halves stay inside one XLA loop fusion with the product feeding them,
    where a reduce over a short axis does not: on XLA:CPU this runs the decode attention at memory
    speed (see `decode_attention`).
    """
    axis = axis % x.ndim
    while x.shape[axis] > 1 and x.shape[axis] % 2 == 0:
        lo, hi = jnp.split(x, 2, axis=axis)
        x = lo + hi
    return jnp.sum(x, axis=axis)


def decode_attention(q, k_cache, v_cache, key_ok, *, scale=None, softcap=None):
    """Attention of one query per row against the cache, as fused products and sums.

    q [B, H, Dh]; k_cache, v_cache [B, K, S, Dh] (H a multiple of K); key_ok [B, S] bool ->
    [B, H, Dh]. The same numbers as `attention` with one query (float32 scores and softmax;
    `scale` defaults to Dh ** -0.5). A [1, Dh] x [Dh, S] product per (row, head) is far below what
    a matmul kernel is built for: XLA:CPU's batched dot runs it at a few GFLOP/s, twice slower than
    streaming the cache in a loop fusion.
    """
    b, h, dh = q.shape
    kh = k_cache.shape[1]
    scale = dh**-0.5 if scale is None else scale
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k_cache, v_cache))
    if (
        kh == h
    ):  # no groups: 4-D arrays (a size-1 group axis makes XLA:CPU's odd-S reduce ~20x slower)
        scores = _pairwise_sum(q32[:, :, None, :] * k32, axis=-1)  # [B, H, S]
        ok = key_ok[:, None, :]
    else:
        q32 = q32.reshape(b, kh, h // kh, 1, dh)
        k32, v32 = k32[:, :, None], v32[:, :, None]  # [B, K, 1, S, Dh]
        scores = _pairwise_sum(q32 * k32, axis=-1)  # [B, K, G, S]
        ok = key_ok[:, None, None, :]
    scores = jnp.where(ok, softcapped(scores * jnp.float32(scale), softcap), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    y = _pairwise_sum(probs[..., None] * v32, axis=-2)  # [B, H, Dh] or [B, K, G, Dh]
    return y.reshape(b, h, dh).astype(q.dtype)


class Attention(nn.Module):
    config: TransformerConfig
    layer: int

    @nn.compact
    def __call__(self, x, mask, rope, kv, index):
        """x [B, T, D]; mask [B or 1, 1, T, S] bool, or None for causal attention without padding
        (full forward passes only), or a `Padding` (full passes with attention="cudnn"); rope
        (cos, sin) or None; kv None or (k, v) [B, K, S, Dh] -> (y [B, T, D], kv)."""
        cfg = self.config
        h, kh, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = dense((h, dh), cfg, "q", bias=cfg.qkv_bias)(x)  # [B, T, H, Dh]
        k = dense((kh, dh), cfg, "k", bias=cfg.qkv_bias)(x)  # [B, T, K, Dh]
        v = dense((kh, dh), cfg, "v", bias=cfg.qkv_bias)(x)
        if cfg.qk_norm:  # per head, before RoPE (Qwen 3, Gemma 3)
            q = RMSNorm(cfg.layer_norm_eps, cfg.norm_offset, cfg.compute_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.layer_norm_eps, cfg.norm_offset, cfg.compute_dtype, name="k_norm")(k)
        if rope is not None:
            q, k = apply_rope(q, rope, cfg.rotary_dim), apply_rope(k, rope, cfg.rotary_dim)
        scale = dh**-0.5 if cfg.attn_scale is None else cfg.attn_scale
        softcap = cfg.attn_softcap
        if kv is not None:
            # The cache is head-major [B, K, S, Dh]: a decode step streams it per (row, head)
            # without transposes, and for a chunk XLA cancels the swapaxes below against the
            # attention's own.
            k_cache, v_cache = kv
            k_new = jnp.swapaxes(k, 1, 2).astype(k_cache.dtype)  # [B, K, T, Dh]
            v_new = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, (0, 0, index, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, (0, 0, index, 0))
            kv = (k_cache, v_cache)
            if x.shape[1] == 1:  # one decode step: a batched mat-vec, see decode_attention
                y = decode_attention(
                    q[:, 0], k_cache, v_cache, mask[:, 0, 0], scale=scale, softcap=softcap
                )[:, None]
            else:  # a chunk (prefill)
                k = jnp.swapaxes(k_cache, 1, 2).astype(q.dtype)  # [B, S, K, Dh]
                v = jnp.swapaxes(v_cache, 1, 2).astype(q.dtype)
                y = attention(q, k, v, mask, scale, softcap)  # [B, T, H, Dh]
        elif cfg.attention == "cudnn" and softcap is None and cfg.window(self.layer) is None:
            y = cudnn_attention(q, k, v, mask, scale)  # mask: None or a Padding
        else:
            mask = mask.mask if isinstance(mask, Padding) else mask
            y = attention(q, k, v, mask, scale, softcap)
        o = dense(cfg.d_model, cfg, "o", bias=cfg.out_bias, axis=(-2, -1), std=residual_std(cfg))
        return o(y), kv
