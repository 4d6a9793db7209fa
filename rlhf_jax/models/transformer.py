"""One Flax Linen decoder for every family (GPT-2, Llama 3, Mistral, Qwen 2/3, Gemma 2/3,
GPT-NeoX) with a KV cache.

Identical in function to the Hugging Face model of each family (`GPT2LMHeadModel`,
`LlamaForCausalLM`, ...): what differs between families is read from `TransformerConfig` fields
(norm kind, learned positions or RoPE with its scaling, grouped-query attention, q/k norms,
sliding windows per layer, soft-caps, gated MLPs, post-norms, parallel residual, tied or untied
output layer); no code path looks at the family name.

Parameter layout (the same names for every family; `hf.py` maps each family's tensors onto it):

    embed/embedding [V, D]            pos_embed/embedding [max_len, D]  (learned positions only)
    layers_{i}/attn_norm/scale (+bias for LayerNorm)
    layers_{i}/attn/{q,k,v}/kernel [D, heads, Dh] (+bias [heads, Dh])   heads = H for q, K for k/v
    layers_{i}/attn/o/kernel [H, Dh, D] (+bias [D])
    layers_{i}/attn/{q_norm,k_norm}/scale [Dh]                            (qk_norm)
    layers_{i}/attn_post_norm, layers_{i}/mlp_post_norm                   (post_norms)
    layers_{i}/mlp_norm
    layers_{i}/mlp/{gate,up}/kernel [D, F], layers_{i}/mlp/down/kernel [F, D] (+biases)
    final_norm                        lm_head/kernel [D, V]             (untied only)

Attention projections keep their head axis, so the tensor-parallel split of `sharding.py` is
head-aligned by construction (q/k/v/o split over heads, kv heads as their count allows).

Dtype policy: parameters float32; matmuls and attention in `config.dtype`; the residual stream,
norm statistics, RoPE angles, attention softmax and the logits stay float32.

Attention: scores `q·k * scale` (soft-capped when `attn_softcap`), masked, softmax in float32;
`config.attention = "cudnn"` selects cuDNN's fused flash attention for full forward passes of
layers without a sliding window or soft-cap on NVIDIA GPUs (bfloat16), for unpadded and
right-padded batches (others fall back to XLA at run time, see `_cudnn_attention`). A decode step
(one token against the cache) uses `_decode_attention`, the same numbers as fused products and sums.

Padding: `attention_mask` [B, T] is 1 on real tokens and 0 on pads (left or right). Positions
default to `clip(cumsum(attention_mask) - 1, 0)`, so a left-padded row gives the same logits at its
real tokens as the unpadded row. Keys at pads are masked out; a pad query attends to itself only,
so no softmax row is empty (no NaN), and its output is meaningless. A sliding window of W lets a
query see itself and the W - 1 slots before it (as transformers' `sliding_window_overlay`); the
real tokens of a left- or right-padded row are contiguous, so slots and positions agree there.

Decoding: `Transformer.decode` consumes a chunk of tokens against a preallocated `KVCache`
(`init_cache`), writes their keys/values at slots `[index, index + T)` and returns their logits;
prefilling a prompt and then feeding one token at a time gives the logits of a full forward pass.
The cache holds the kv heads only ([B, K, S, Dh] per layer, head-major so that a decode step reads
it without transposes); sliding-window layers mask the slots older than their window.
"""

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from rlhf_jax import sharding as sh
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.projection import LORA_DROPOUT_RNG, Projection

_INIT_STD = 0.02  # GPT-2 / HF initializer_range
_NEG = -0.7 * float(np.finfo(np.float32).max)  # masked scores (as jax.nn.dot_product_attention)


class KVCache(NamedTuple):
    """Preallocated keys/values of every layer, shared by all rows of a batch.

    Slots are filled left to right by `Transformer.decode`, the same slot index for every row;
    `key_mask` says which slots hold real (non-pad) tokens and `positions` is the next position id
    of each row (its number of real tokens so far).
    """

    k: tuple[Array, ...]  # n_layers x [B, K, S, Dh] (head-major, kv heads only)
    v: tuple[Array, ...]  # n_layers x [B, K, S, Dh]
    key_mask: Array  # [B, S] bool
    index: Array  # [] int32, next free slot
    positions: Array  # [B] int32


def init_cache(config: TransformerConfig, batch_size: int, max_slots: int, dtype=None) -> KVCache:
    """An empty cache with room for `max_slots` tokens per row (dtype defaults to config.dtype)."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch_size, config.n_kv_heads, max_slots, config.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)),
        key_mask=jnp.zeros((batch_size, max_slots), bool),
        index=jnp.zeros((), jnp.int32),
        positions=jnp.zeros((batch_size,), jnp.int32),
    )


def _residual_std(cfg: TransformerConfig) -> float:
    return _INIT_STD / (2 * cfg.n_layers) ** 0.5  # GPT-2's scaled init of residual projections


def _dense(features, cfg: TransformerConfig, name: str, *, bias: bool, axis=-1, std=_INIT_STD):
    features = features if isinstance(features, tuple) else (features,)
    in_axes = len(axis) if isinstance(axis, tuple) else 1
    return Projection(features, in_axes, use_bias=bias, dtype=cfg.compute_dtype, std=std, name=name)


class _RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * w (or * (1 + w) with `offset`, Gemma), statistics in float32."""

    eps: float
    offset: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * ((1.0 + scale) if self.offset else scale)).astype(self.dtype)


def _norm(cfg: TransformerConfig, name: str) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return _RMSNorm(cfg.layer_norm_eps, cfg.norm_offset, cfg.compute_dtype, name=name)
    # LayerNorm statistics in float32 whatever the compute dtype; exact (two-pass) variance.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )


@jax.custom_vjp
def _grad_barrier(x):
    """Identity; its cotangent goes through `lax.optimization_barrier` in the backward pass.

    The gradient of the residual stream is a sum over every later block. Without a barrier
    XLA:CPU fuses that sum into each of its consumers and recomputes it there, so backward work
    grows with n_layers² (a 4-layer DPO step spent ~20 % of its time in such re-fused copies). The
    barrier materialises the cotangent once per LayerNorm input. Numbers are unchanged.
    """
    return x


def _grad_barrier_fwd(x):
    return x, None


def _grad_barrier_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


_grad_barrier.defvjp(_grad_barrier_fwd, _grad_barrier_bwd)


def _barrier(cfg: TransformerConfig, x):
    return _grad_barrier(x) if cfg.grad_barrier else x


# --------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: TransformerConfig, table: str = "global") -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] (float32, computed as transformers does) of the
    "global" table or of Gemma 3's "local" one (sliding layers: `rope_local_theta`, unscaled)."""
    dim = cfg.rotary_dim
    theta = cfg.rope_local_theta if table == "local" else cfg.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if table == "local" or cfg.rope_type == "default":
        return inv
    factor = np.float32(cfg.rope_factor)
    if cfg.rope_type == "linear":
        return (inv / factor).astype(np.float32)
    # "llama3" (Llama 3.1+): long wavelengths divided by the factor, short ones kept, a smooth
    # interpolation in between.
    old = np.float32(cfg.rope_original_max_len)
    low, high = np.float32(cfg.rope_low_freq_factor), np.float32(cfg.rope_high_freq_factor)
    wavelen = np.float32(2 * np.pi) / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_tables(cfg: TransformerConfig, positions: Array) -> dict[str, tuple[Array, Array]]:
    """(cos, sin) [B, T, 1, rotary_dim / 2] float32 of every table the layers use."""
    if cfg.positions != "rope":
        return {}
    keys = {cfg.rope_key(i) for i in range(cfg.n_layers)}
    out = {}
    for key in sorted(keys):
        inv = jnp.asarray(rope_inv_freq(cfg, key))
        angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, R/2]
        out[key] = (jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :])
    return out


def _apply_rope(x: Array, rope: tuple[Array, Array], rotary_dim: int) -> Array:
    """Rotates the first `rotary_dim` dims of each head of x [B, T, heads, Dh] (transformers'
    rotate-half convention: pairs (i, i + R/2)), in float32, back to x's dtype."""
    cos, sin = rope
    half = rotary_dim // 2
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    return jnp.concatenate([*rotated, rest], axis=-1).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Attention


def _softcap(x, cap):
    return x if cap is None else cap * jnp.tanh(x / cap)


def _attention(q, k, v, mask, scale, softcap=None):
    """Grouped-query attention of a full pass or a prefill chunk, XLA ops.

    q [B, T, H, Dh]; k, v [B, S, K, Dh] with H a multiple of K; mask [B or 1, 1, T, S] bool, or
    None for causal attention (T == S) -> [B, T, H, Dh]. The numbers of
    `jax.nn.dot_product_attention`'s XLA path (float32 scores and softmax), plus the soft-cap.
    """
    b, t, h, dh = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = _softcap(scores * jnp.float32(scale), softcap)  # [B, K, G, T, S]
    if mask is None:
        mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None, None]
    scores = jnp.where(mask[:, :, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return y.reshape(b, t, h, dh)


class _Padding(NamedTuple):
    """The padding of a full forward pass, for the cuDNN path: the XLA mask, each row's number
    of real tokens and whether every row is right-padded (its real tokens first)."""

    mask: Array  # [B, 1, T, T] bool
    lengths: Array  # [B] int32
    right_padded: Array  # [] bool


def _padding(attention_mask: Array, mask: Array) -> _Padding:
    ok = attention_mask.astype(bool)  # [B, T]
    lengths = ok.sum(axis=-1, dtype=jnp.int32)  # [B]
    right_padded = jnp.all(ok == (jnp.arange(ok.shape[1])[None, :] < lengths[:, None]))
    return _Padding(mask, lengths, right_padded)


def _cudnn_attention(q, k, v, padding: _Padding | None, scale: float):
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
        lambda: _attention(q, k, v, padding.mask, scale),
    )


def _pairwise_sum(x, axis):
    """Sum over `axis` by halving it while its length is even (then a plain sum of the rest).

    Elementwise adds of two halves stay inside one XLA loop fusion with the product feeding them,
    where a reduce over a short axis does not: on XLA:CPU this runs the decode attention at memory
    speed (see `_decode_attention`).
    """
    axis = axis % x.ndim
    while x.shape[axis] > 1 and x.shape[axis] % 2 == 0:
        lo, hi = jnp.split(x, 2, axis=axis)
        x = lo + hi
    return jnp.sum(x, axis=axis)


def _decode_attention(q, k_cache, v_cache, key_ok, *, scale=None, softcap=None):
    """Attention of one query per row against the cache, as fused products and sums.

    q [B, H, Dh]; k_cache, v_cache [B, K, S, Dh] (H a multiple of K); key_ok [B, S] bool ->
    [B, H, Dh]. The same numbers as `_attention` with one query (float32 scores and softmax;
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
    scores = jnp.where(ok, _softcap(scores * jnp.float32(scale), softcap), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    y = _pairwise_sum(probs[..., None] * v32, axis=-2)  # [B, H, Dh] or [B, K, G, Dh]
    return y.reshape(b, h, dh).astype(q.dtype)


class _Attention(nn.Module):
    config: TransformerConfig
    layer: int

    @nn.compact
    def __call__(self, x, mask, rope, kv, index):
        """x [B, T, D]; mask [B or 1, 1, T, S] bool, or None for causal attention without padding
        (full forward passes only), or a `_Padding` (full passes with attention="cudnn"); rope
        (cos, sin) or None; kv None or (k, v) [B, K, S, Dh] -> (y [B, T, D], kv)."""
        cfg = self.config
        h, kh, dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = _dense((h, dh), cfg, "q", bias=cfg.qkv_bias)(x)  # [B, T, H, Dh]
        k = _dense((kh, dh), cfg, "k", bias=cfg.qkv_bias)(x)  # [B, T, K, Dh]
        v = _dense((kh, dh), cfg, "v", bias=cfg.qkv_bias)(x)
        if cfg.qk_norm:  # per head, before RoPE (Qwen 3, Gemma 3)
            q = _RMSNorm(cfg.layer_norm_eps, cfg.norm_offset, cfg.compute_dtype, name="q_norm")(q)
            k = _RMSNorm(cfg.layer_norm_eps, cfg.norm_offset, cfg.compute_dtype, name="k_norm")(k)
        if rope is not None:
            q, k = _apply_rope(q, rope, cfg.rotary_dim), _apply_rope(k, rope, cfg.rotary_dim)
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
            if x.shape[1] == 1:  # one decode step: a batched mat-vec, see _decode_attention
                y = _decode_attention(
                    q[:, 0], k_cache, v_cache, mask[:, 0, 0], scale=scale, softcap=softcap
                )[:, None]
            else:  # a chunk (prefill)
                k = jnp.swapaxes(k_cache, 1, 2).astype(q.dtype)  # [B, S, K, Dh]
                v = jnp.swapaxes(v_cache, 1, 2).astype(q.dtype)
                y = _attention(q, k, v, mask, scale, softcap)  # [B, T, H, Dh]
        elif cfg.attention == "cudnn" and softcap is None and cfg.window(self.layer) is None:
            y = _cudnn_attention(q, k, v, mask, scale)  # mask: None or a _Padding
        else:
            mask = mask.mask if isinstance(mask, _Padding) else mask
            y = _attention(q, k, v, mask, scale, softcap)
        o = _dense(cfg.d_model, cfg, "o", bias=cfg.out_bias, axis=(-2, -1), std=_residual_std(cfg))
        return o(y), kv


_ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # HF "gelu_new" / "..._tanh"
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact (erf)
    "silu": jax.nn.silu,
}


class _MLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = _ACTIVATIONS[cfg.activation]
        up = _dense(cfg.d_ff, cfg, "up", bias=cfg.mlp_bias)(x)
        if cfg.mlp == "gated":  # SwiGLU / GeGLU
            up = act(_dense(cfg.d_ff, cfg, "gate", bias=cfg.mlp_bias)(x)) * up
        else:
            up = act(up)
        return _dense(cfg.d_model, cfg, "down", bias=cfg.mlp_bias, std=_residual_std(cfg))(up)


class _Block(nn.Module):
    config: TransformerConfig
    layer: int

    @nn.compact
    def __call__(self, x, mask, rope, kv=None, index=None):
        cfg = self.config
        x_in = _barrier(cfg, x)
        y, kv = _Attention(cfg, self.layer, name="attn")(
            _norm(cfg, "attn_norm")(x_in), mask, rope, kv, index
        )
        if cfg.post_norms:
            y = _norm(cfg, "attn_post_norm")(y)
        if cfg.parallel_residual:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            return x + y + _MLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x_in)), kv
        x = x + y  # float32 residual stream
        m = _MLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(_barrier(cfg, x)))
        if cfg.post_norms:
            m = _norm(cfg, "mlp_post_norm")(m)
        return x + m, kv


class _Head(nn.Module):
    """Untied output layer: logits = h @ kernel [D, V], accumulated in float32."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        init = nn.initializers.normal(_INIT_STD)
        kernel = self.param("kernel", init, (cfg.d_model, cfg.vocab_size), jnp.float32)
        dt = cfg.compute_dtype
        return jnp.einsum(
            "btd,dv->btv", h.astype(dt), kernel.astype(dt), preferred_element_type=jnp.float32
        )


def _positions_from_mask(attention_mask: Array) -> Array:
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _windows(cfg: TransformerConfig) -> list[int | None]:
    return sorted(
        {cfg.window(i) for i in range(cfg.n_layers)}, key=lambda w: -1 if w is None else w
    )


def _within(window: int | None, query: Array, key: Array) -> Array | bool:
    """True where key slot `key` is inside the sliding window of query slot `query`."""
    return True if window is None else key > query - window


def layer_period(cfg: TransformerConfig) -> int:
    """The smallest p dividing n_layers such that layer i attends like layer i mod p (its sliding
    window and RoPE table): `scan_layers` scans over n_layers / p groups of p blocks (1 for most
    models, 2 for Gemma 2's sliding/global pairs, 6 for Gemma 3's 5:1 pattern)."""
    kinds = [(cfg.window(i), cfg.rope_key(i)) for i in range(cfg.n_layers)]
    return next(
        p
        for p in range(1, cfg.n_layers + 1)
        if cfg.n_layers % p == 0 and all(k == kinds[i % p] for i, k in enumerate(kinds))
    )


# The leaves each projection casts to the compute dtype before use (`Projection`: kernel and
# bias; its LoRA adapter's a and b), by collection.
_CAST_LEAVES = {"params": ("kernel", "bias"), "lora": ("a", "b")}
_PROJECTIONS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def _as_computed(collection: str, layer: Any, dtype: Any) -> Any:
    """One layer's variables of `collection` with the projections' float32 leaves that the
    block casts to `dtype` anyway cast here: stacking then copies, and the scan's backward pass
    accumulates, the compute-dtype arrays (numbers unchanged: the cast's gradient is the same
    cast back, applied to the same compute-dtype gradient)."""
    names = _CAST_LEAVES.get(collection, ())
    if not names or jnp.dtype(dtype) == jnp.float32:
        return layer
    out = dict(layer)
    for part, projections in _PROJECTIONS.items():
        if part not in out:
            continue
        out[part] = dict(out[part])
        for proj in projections:
            module = out[part].get(proj)
            if module is None:
                continue
            out[part][proj] = {
                k: v.astype(dtype) if k in names and v.dtype == jnp.float32 else v
                for k, v in module.items()
            }
    return out


def _stack_layers(variables: Any, layers: range, dtype: Any = jnp.float32) -> dict:
    """Every collection's `layers_{i}` subtrees for i in `layers`, stacked leaf by leaf on a new
    leading axis, the projections' weights in the compute `dtype` (`_as_computed`). The layers
    must hold the same variables (shapes and names)."""
    out = {}
    for collection, tree in variables.items():
        trees = [tree.get(f"layers_{i}") for i in layers]
        trees = [t if t is None else _as_computed(collection, t, dtype) for t in trees]
        if all(t is None for t in trees):
            continue
        first = jax.tree.structure(trees[0])
        for i, t in zip(layers, trees):
            if t is None or jax.tree.structure(t) != first:
                raise ValueError(
                    f"scan_layers: the {collection!r} variables of layers_{i} differ from those "
                    f"of layers_{layers[0]} (e.g. adapters on some layers only); set "
                    "scan_layers=False"
                )
        out[collection] = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    return out


# Remat policies by name (`TransformerConfig.remat`): what each block keeps for the backward pass.
_REMAT_POLICIES = {
    "full": lambda: None,  # nothing but the block's input: everything recomputed
    "dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """Decoder: `apply({"params": p}, tokens, attention_mask=None, positions=None) -> logits`.

    Other methods (pass as `method=`): `hidden` (final-norm states for heads), `logits`
    (hidden -> float32 logits) and `decode` (chunked decoding against a `KVCache`).
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        embed_init = nn.initializers.normal(_INIT_STD)
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embed(cfg.max_len, cfg.d_model, embedding_init=embed_init)
        block = _Block
        if cfg.remat != "none":
            block = nn.remat(_Block, policy=_REMAT_POLICIES[cfg.remat]())
        self.layers = [block(cfg, i, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = _norm(cfg, "final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = _Head(cfg)

    def _embed(self, tokens, positions):
        cfg = self.config
        x = self.embed(tokens)  # [B, T, D] float32
        if cfg.embed_scale:  # Gemma: the normaliser sqrt(D), rounded to float32
            x = x * jnp.float32(cfg.d_model**0.5)
        if cfg.positions == "learned":
            x = x + self.pos_embed(positions)
        return x

    def _blocks(self, x, masks, rope, cache=None, index=None):
        if self.config.scan_layers and cache is None and not self.is_initializing():
            return self._scanned_blocks(x, masks, rope), (), ()
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            cfg = self.config
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, kv = block(x, masks[cfg.window(i)], rope.get(cfg.rope_key(i)), kv, index)
            x = sh.constrain(x, sh.BATCH_AXES)  # the residual stream: rows split like the batch
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        return x, tuple(new_k), tuple(new_v)

    def _scanned_blocks(self, x, masks, rope):
        """`_blocks` as one `lax.scan` over groups of `layer_period(cfg)` layers, each group's
        variables (every collection: params, LoRA adapters, quantized kernels) stacked here."""
        cfg = self.config
        period = layer_period(cfg)
        groups = cfg.n_layers // period
        stacked = [
            _stack_layers(self.variables, range(j, cfg.n_layers, period), cfg.compute_dtype)
            for j in range(period)
        ]
        keys = None
        if self.has_rng(LORA_DROPOUT_RNG):  # LoRA dropout: one key per layer
            base = self.make_rng(LORA_DROPOUT_RNG)
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(cfg.n_layers))
            keys = keys.reshape(groups, period, *keys.shape[1:])
        policy = _REMAT_POLICIES[cfg.remat]() if cfg.remat != "none" else None

        def run_block(j, variables, key, x):
            rngs = {} if key is None else {LORA_DROPOUT_RNG: key}
            block = _Block(cfg, j, parent=None)
            y, _ = block.apply(variables, x, masks[cfg.window(j)], rope.get(cfg.rope_key(j)),
                               rngs=rngs)  # fmt: skip
            return y

        def body(x, group):
            variables, keys = group
            for j in range(period):
                key = None if keys is None else keys[j]
                fn = functools.partial(run_block, j)
                if cfg.remat != "none":
                    fn = jax.checkpoint(fn, policy=policy, prevent_cse=False)
                x = fn(variables[j], key, x)
                x = sh.constrain(x, sh.BATCH_AXES)  # the residual stream: rows split like the batch
            return x, None

        x, _ = jax.lax.scan(body, x, (stacked, keys), length=groups)
        return x

    def hidden(
        self,
        tokens: Int[ArrayLike, "B T"],
        attention_mask: Shaped[ArrayLike, "B T"] | None = None,
        positions: Int[ArrayLike, "B T"] | None = None,
    ) -> Float[Array, "B T D"]:
        """Final-norm hidden states [B, T, D] (float32) of a full causal forward pass."""
        cfg = self.config
        tokens = jnp.asarray(tokens)
        t = tokens.shape[1]
        idx = jnp.arange(t)
        causal = idx[None, :] <= idx[:, None]  # [T(query), T(key)]
        masks = {}
        if attention_mask is None:
            if positions is None:
                positions = jnp.broadcast_to(idx, tokens.shape)
            for w in _windows(cfg):  # None: causal only (the attention builds it)
                masks[w] = (
                    None if w is None else (causal & _within(w, idx[:, None], idx))[None, None]
                )
        else:
            attention_mask = jnp.asarray(attention_mask)
            key_ok = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]
            if positions is None:
                positions = _positions_from_mask(attention_mask)
            for w in _windows(cfg):
                # A pad query attends to itself so that no softmax row is empty.
                m = (causal & _within(w, idx[:, None], idx) & key_ok) | jnp.eye(t, dtype=bool)
                masks[w] = m  # [B, 1, T, T]
            if cfg.attention == "cudnn" and None in masks:
                masks[None] = _padding(attention_mask, masks[None])
        positions = jnp.asarray(positions)
        # Rows split like the batch from the first activation on. Without it, an input whose
        # row split XLA cannot see (the sampler's output inside one RL program) takes the
        # FSDP-split width of the embedding instead, and every chip computes every row.
        x = sh.constrain(self._embed(tokens, positions), sh.BATCH_AXES)
        x, _, _ = self._blocks(x, masks, _rope_tables(cfg, positions))
        return self.final_norm(_barrier(cfg, x)).astype(jnp.float32)

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Output layer (tied: hidden @ embed.T; else lm_head), float32, soft-capped if set."""
        cfg = self.config
        dt = cfg.compute_dtype
        if cfg.tie_embeddings:
            emb = self.embed.embedding.astype(dt)  # [V, D]
            out = jnp.einsum(
                "btd,vd->btv", hidden.astype(dt), emb, preferred_element_type=jnp.float32
            )
        else:
            out = self.lm_head(hidden)
        return _softcap(out.astype(jnp.float32), cfg.final_softcap)

    def output_weight(self) -> Float[Array, "_ _"]:
        """The output layer: the LM head's kernel [D, V], or the tied embedding [V, D]."""
        if self.config.tie_embeddings:
            return self.embed.embedding
        return self.lm_head.variables["params"]["kernel"]

    def hidden_and_output_weight(
        self,
        tokens: Int[ArrayLike, "B T"],
        attention_mask: Shaped[ArrayLike, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T D"], Float[Array, "_ _"]]:
        """(`hidden(tokens, attention_mask)`, `output_weight()`): what the log-probs in chunks of
        positions read (`train.logps`), never the whole [B, T, V] logits."""
        return self.hidden(tokens, attention_mask), self.output_weight()

    def __call__(
        self,
        tokens: Int[ArrayLike, "B T"],
        attention_mask: Shaped[ArrayLike, "B T"] | None = None,
        positions: Int[ArrayLike, "B T"] | None = None,
    ) -> Float[Array, "B T V"]:
        """Next-token logits [B, T, V] (float32) of a full causal forward pass."""
        return self.logits(self.hidden(tokens, attention_mask, positions))

    def decode(
        self,
        tokens: Int[ArrayLike, "B T"],
        attention_mask: Shaped[ArrayLike, "B T"],
        cache: KVCache,
        last_only: bool = False,
    ) -> tuple[Float[Array, "B _T V"], KVCache]:
        """Logits of `tokens` given everything already in `cache`, and the updated cache.

        The chunk goes to slots [cache.index, cache.index + T) of every row; its positions continue
        each row's count of real tokens. `last_only=True` returns logits of the last token only
        ([B, 1, V]), which is what a sampler needs after a prefill.
        """
        cfg = self.config
        tokens = jnp.asarray(tokens)
        new_ok = jnp.asarray(attention_mask).astype(bool)  # [B, T]
        t, s = tokens.shape[1], cache.key_mask.shape[1]
        positions = cache.positions[:, None] + _positions_from_mask(new_ok)  # [B, T]
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, new_ok, (0, cache.index))  # [B, S]
        query = (cache.index + jnp.arange(t))[:, None]  # [T, 1]
        slots = jnp.arange(s)[None, :]  # [1, S]
        masks = {}
        for w in _windows(cfg):
            m = key_mask[:, None, None, :] & (slots <= query) & _within(w, query, slots)
            masks[w] = m | (slots == query)  # [B, 1, T, S]; a pad query sees itself
        x = self._embed(tokens, positions)
        x, new_k, new_v = self._blocks(x, masks, _rope_tables(cfg, positions), cache, cache.index)
        if last_only:
            x = x[:, -1:]
        logits = self.logits(self.final_norm(x).astype(jnp.float32))
        cache = KVCache(
            k=new_k,
            v=new_v,
            key_mask=key_mask,
            index=cache.index + t,
            positions=cache.positions + new_ok.sum(axis=1, dtype=jnp.int32),
        )
        return logits, cache


def init_params(config: TransformerConfig, rng: Array) -> dict:
    """Randomly initialised parameters (GPT-2 scheme: N(0, 0.02), residual projections scaled by
    1/sqrt(2 n_layers), zero biases, unit norm scales (zero for Gemma's 1 + w)) as a nested dict."""
    return _init_params(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: TransformerConfig, rng: Array) -> dict:
    return Transformer(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
