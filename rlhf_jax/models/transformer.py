"""A Flax Linen decoder with the GPT-2 architecture (Radford et al. 2019) and a KV cache.

Identical in function to Hugging Face's `GPT2LMHeadModel`: learned positions, pre-LayerNorm blocks,
GELU with the tanh approximation ("gelu_new"), output logits tied to the token embedding
(`logits = ln_f(h) @ wte.T`). Parameter names mirror HF's so that the converter in `hf.py` is a
renaming (HF's Conv1D weights are [in, out], the layout of a Flax Dense kernel).

Dtype policy: parameters float32; matmuls and attention in `config.dtype`; the residual stream,
LayerNorm statistics, attention softmax and the logits stay float32.

Attention: `jax.nn.dot_product_attention`, XLA's implementation by default; `config.attention =
"cudnn"` selects cuDNN's fused flash attention for full forward passes on NVIDIA GPUs (bfloat16),
for unpadded and right-padded batches (others fall back to XLA at run time, see
`_cudnn_attention`).
A decode step (one token against the cache) uses `_decode_attention`, the same numbers as fused
products and sums.

Padding: `attention_mask` [B, T] is 1 on real tokens and 0 on pads (left or right). Positions
default to `clip(cumsum(attention_mask) - 1, 0)`, so a left-padded row gives the same logits at its
real tokens as the unpadded row. Keys at pads are masked out; a pad query attends to itself only,
so no softmax row is empty (no NaN), and its output is meaningless.

Decoding: `Transformer.decode` consumes a chunk of tokens against a preallocated `KVCache`
(`init_cache`), writes their keys/values at slots `[index, index + T)` and returns their logits;
prefilling a prompt and then feeding one token at a time gives the logits of a full forward pass.
The cache is head-major ([B, H, S, Dh] per layer) so that a decode step reads it without
transposes.
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from rlhf_jax.models.config import TransformerConfig

_INIT_STD = 0.02  # GPT-2 / HF initializer_range


class KVCache(NamedTuple):
    """Preallocated keys/values of every layer, shared by all rows of a batch.

    Slots are filled left to right by `Transformer.decode`, the same slot index for every row;
    `key_mask` says which slots hold real (non-pad) tokens and `positions` is the next position id
    of each row (its number of real tokens so far).
    """

    k: tuple[Array, ...]  # n_layers x [B, H, S, Dh] (head-major)
    v: tuple[Array, ...]  # n_layers x [B, H, S, Dh]
    key_mask: Array  # [B, S] bool
    index: Array  # [] int32, next free slot
    positions: Array  # [B] int32


def init_cache(config: TransformerConfig, batch_size: int, max_slots: int, dtype=None) -> KVCache:
    """An empty cache with room for `max_slots` tokens per row (dtype defaults to config.dtype)."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch_size, config.n_heads, max_slots, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)),
        key_mask=jnp.zeros((batch_size, max_slots), bool),
        index=jnp.zeros((), jnp.int32),
        positions=jnp.zeros((batch_size,), jnp.int32),
    )


def _dense(features: int, cfg: TransformerConfig, name: str, std: float = _INIT_STD) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


def _layer_norm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
    # Statistics are computed in float32 whatever the compute dtype; exact (two-pass) variance.
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


class _Attention(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, kv, index):
        """x [B, T, D]; mask [B, 1, T, S] bool, or None for causal attention without padding (full
        forward passes only), or a `_Padding` (full forward passes with attention="cudnn"); kv
        None or (k, v) [B, H, S, Dh] -> (y, kv)."""
        cfg = self.config
        b, t, d = x.shape
        qkv = _dense(3 * d, cfg, "c_attn")(x)  # [B, T, 3D]
        q, k, v = (a.reshape(b, t, cfg.n_heads, cfg.head_dim) for a in jnp.split(qkv, 3, -1))
        if kv is not None:
            # The cache is head-major [B, H, S, Dh]: a decode step streams it per (row, head)
            # without transposes, and for a chunk XLA cancels the swapaxes below against
            # dot_product_attention's own.
            k_cache, v_cache = kv
            k_new = jnp.swapaxes(k, 1, 2).astype(k_cache.dtype)  # [B, H, T, Dh]
            v_new = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, (0, 0, index, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, (0, 0, index, 0))
            kv = (k_cache, v_cache)
            if t == 1:  # one decode step: a batched mat-vec, see _decode_attention
                y = _decode_attention(q[:, 0], k_cache, v_cache, mask[:, 0, 0])[:, None]
            else:  # a chunk (prefill): softmax in float32 inside dot_product_attention (XLA)
                k = jnp.swapaxes(k_cache, 1, 2).astype(q.dtype)  # [B, S, H, Dh]
                v = jnp.swapaxes(v_cache, 1, 2).astype(q.dtype)
                y = jax.nn.dot_product_attention(q, k, v, mask=mask)  # [B, T, H, Dh]
        elif cfg.attention == "cudnn":
            y = _cudnn_attention(q, k, v, mask)
        else:  # mask None: causal without padding; softmax in float32 (XLA implementation)
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None)
        y = _dense(d, cfg, "c_proj", _INIT_STD / (2 * cfg.n_layers) ** 0.5)(y.reshape(b, t, d))
        return y, kv


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


def _cudnn_attention(q, k, v, padding: _Padding | None):
    """Causal attention through cuDNN's fused flash kernel, [B, T, H, Dh] in and out.

    Padding goes in as sequence lengths, never as a bias: cuDNN (through JAX) has no gradient for
    a per-row bias (jax-ml/jax#30593). Lengths describe right-padded rows only, so a batch with
    any other padding (left-padded prompts, say) takes XLA's implementation with the full mask
    instead: `lax.cond` picks per call, on device, and both give the same real-token outputs.
    """

    def fused(lengths=None):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            implementation="cudnn",
        )  # fmt: skip

    if padding is None:
        return fused()
    return jax.lax.cond(
        padding.right_padded,
        lambda: fused(padding.lengths),
        lambda: jax.nn.dot_product_attention(q, k, v, mask=padding.mask),
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


def _decode_attention(q, k_cache, v_cache, key_ok):
    """Attention of one query per row against the cache, as fused products and sums.

    q [B, H, Dh]; k_cache, v_cache [B, H, S, Dh]; key_ok [B, S] bool -> [B, H, Dh]. The same
    numbers as `jax.nn.dot_product_attention` with one query (float32 softmax). A [1, Dh] x
    [Dh, S] product per (row, head) is far below what a matmul kernel is built for: XLA:CPU's
    batched dot runs it at a few GFLOP/s, twice slower than streaming the cache in a loop fusion.
    """
    scale = q.shape[-1] ** -0.5
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k_cache, v_cache))
    scores = _pairwise_sum(q32[:, :, None, :] * k32, axis=-1)  # [B, H, S]
    scores = jnp.where(key_ok[:, None, :], scores * scale, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, H, S]
    y = _pairwise_sum(probs[..., None] * v32, axis=2)  # [B, H, Dh]
    return y.astype(q.dtype)


class _MLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = jax.nn.gelu(_dense(cfg.d_ff, cfg, "c_fc")(x), approximate=True)  # HF "gelu_new"
        return _dense(cfg.d_model, cfg, "c_proj", _INIT_STD / (2 * cfg.n_layers) ** 0.5)(h)


class _Block(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, kv=None, index=None):
        cfg = self.config
        y, kv = _Attention(cfg, name="attn")(
            _layer_norm(cfg, "ln_1")(_barrier(cfg, x)), mask, kv, index
        )
        x = x + y  # float32 residual stream
        x = x + _MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(_barrier(cfg, x)))
        return x, kv


def _positions_from_mask(attention_mask: Array) -> Array:
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Transformer(nn.Module):
    """GPT-2 decoder: `apply({"params": p}, tokens, attention_mask=None, positions=None) -> logits`.

    Other methods (pass as `method=`): `hidden` (final-LayerNorm states for heads), `logits`
    (hidden -> float32 logits) and `decode` (chunked decoding against a `KVCache`).
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        embed_init = nn.initializers.normal(_INIT_STD)
        self.wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init, name="wte")
        self.wpe = nn.Embed(cfg.max_len, cfg.d_model, embedding_init=embed_init, name="wpe")
        block = nn.remat(_Block) if cfg.remat else _Block
        self.h = [block(cfg, name=f"h_{i}") for i in range(cfg.n_layers)]
        self.ln_f = _layer_norm(cfg, "ln_f")

    def _embed(self, tokens, positions):
        return self.wte(tokens) + self.wpe(positions)  # [B, T, D] float32

    def hidden(
        self,
        tokens: Int[ArrayLike, "B T"],
        attention_mask: Shaped[ArrayLike, "B T"] | None = None,
        positions: Int[ArrayLike, "B T"] | None = None,
    ) -> Float[Array, "B T D"]:
        """Final-LayerNorm hidden states [B, T, D] (float32) of a full causal forward pass."""
        tokens = jnp.asarray(tokens)
        t = tokens.shape[1]
        if attention_mask is None:
            mask = None  # causal only
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
        else:
            attention_mask = jnp.asarray(attention_mask)
            causal = jnp.tril(jnp.ones((t, t), bool))  # [T, T]
            key_ok = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]
            # A pad query attends to itself so that no softmax row is empty.
            mask = (causal & key_ok) | jnp.eye(t, dtype=bool)  # [B, 1, T, T]
            if positions is None:
                positions = _positions_from_mask(attention_mask)
            if self.config.attention == "cudnn":
                mask = _padding(attention_mask, mask)
        x = self._embed(tokens, positions)
        for block in self.h:
            x, _ = block(x, mask)
        return self.ln_f(_barrier(self.config, x)).astype(jnp.float32)

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Tied output layer: hidden @ wte.T, accumulated in float32."""
        dt = self.config.compute_dtype
        emb = self.wte.embedding.astype(dt)  # [V, D]
        return jnp.einsum(
            "btd,vd->btv", hidden.astype(dt), emb, preferred_element_type=jnp.float32
        ).astype(jnp.float32)

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
        tokens = jnp.asarray(tokens)
        new_ok = jnp.asarray(attention_mask).astype(bool)  # [B, T]
        t, s = tokens.shape[1], cache.key_mask.shape[1]
        positions = cache.positions[:, None] + _positions_from_mask(new_ok)  # [B, T]
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, new_ok, (0, cache.index))  # [B, S]
        query_slot = cache.index + jnp.arange(t)  # [T]
        slots = jnp.arange(s)  # [S]
        mask = key_mask[:, None, None, :] & (slots[None, :] <= query_slot[:, None])  # [B,1,T,S]
        mask = mask | (slots[None, :] == query_slot[:, None])  # a pad query sees itself
        x = self._embed(tokens, positions)
        new_k, new_v = [], []
        for i, block in enumerate(self.h):
            x, (k, v) = block(x, mask, (cache.k[i], cache.v[i]), cache.index)
            new_k.append(k)
            new_v.append(v)
        if last_only:
            x = x[:, -1:]
        logits = self.logits(self.ln_f(x).astype(jnp.float32))
        cache = KVCache(
            k=tuple(new_k),
            v=tuple(new_v),
            key_mask=key_mask,
            index=cache.index + t,
            positions=cache.positions + new_ok.sum(axis=1, dtype=jnp.int32),
        )
        return logits, cache


def init_params(config: TransformerConfig, rng: Array) -> dict:
    """Randomly initialised parameters (GPT-2 scheme: N(0, 0.02), residual projections scaled by
    1/sqrt(2 n_layers), zero biases, unit LayerNorm scales) as a plain nested dict."""
    return _init_params(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: TransformerConfig, rng: Array) -> dict:
    return Transformer(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
