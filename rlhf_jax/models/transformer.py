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

Building blocks: `models.layers` (projections, norms, MLP, RoPE) and `models.attention` (full,
cuDNN and decode attention); this module stacks them into the decoder, its KV cache and the scan
over layers.

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
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from rlhf_jax import sharding as sh
from rlhf_jax.models.attention import Attention, padding
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.layers import (
    INIT_STD,
    MLP,
    barrier,
    norm,
    rope_tables,
    softcapped,
)
from rlhf_jax.models.projection import LORA_DROPOUT_RNG


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


class _Block(nn.Module):
    config: TransformerConfig
    layer: int

    @nn.compact
    def __call__(self, x, mask, rope, kv=None, index=None):
        cfg = self.config
        x_in = barrier(cfg, x)
        y, kv = Attention(cfg, self.layer, name="attn")(
            norm(cfg, "attn_norm")(x_in), mask, rope, kv, index
        )
        if cfg.post_norms:
            y = norm(cfg, "attn_post_norm")(y)
        if cfg.parallel_residual:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            return x + y + MLP(cfg, name="mlp")(norm(cfg, "mlp_norm")(x_in)), kv
        x = x + y  # float32 residual stream
        m = MLP(cfg, name="mlp")(norm(cfg, "mlp_norm")(barrier(cfg, x)))
        if cfg.post_norms:
            m = norm(cfg, "mlp_post_norm")(m)
        return x + m, kv


class _Head(nn.Module):
    """Untied output layer: logits = h @ kernel [D, V], accumulated in float32."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        init = nn.initializers.normal(INIT_STD)
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
        embed_init = nn.initializers.normal(INIT_STD)
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embed(cfg.max_len, cfg.d_model, embedding_init=embed_init)
        block = _Block
        if cfg.remat != "none":
            block = nn.remat(_Block, policy=_REMAT_POLICIES[cfg.remat]())
        self.layers = [block(cfg, i, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = norm(cfg, "final_norm")
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
                masks[None] = padding(attention_mask, masks[None])
        positions = jnp.asarray(positions)
        # Rows split like the batch from the first activation on. Without it, an input whose
        # row split XLA cannot see (the sampler's output inside one RL program) takes the
        # FSDP-split width of the embedding instead, and every chip computes every row.
        x = sh.constrain(self._embed(tokens, positions), sh.BATCH_AXES)
        x, _, _ = self._blocks(x, masks, rope_tables(cfg, positions))
        return self.final_norm(barrier(cfg, x)).astype(jnp.float32)

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
        return softcapped(out.astype(jnp.float32), cfg.final_softcap)

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
        x, new_k, new_v = self._blocks(x, masks, rope_tables(cfg, positions), cache, cache.index)
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
