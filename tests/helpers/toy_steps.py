"""A tiny model with the decoder's parameter names and a real optax step, for mesh, multi-host
and resume tests.

The parameter names (`embed/embedding`, `layers_0/attn/q/kernel`, `layers_0/mlp/up/kernel`, ...)
are the decoder's, so `rlhf_jax.sharding.PARTITION_RULES` really splits them over fsdp and tensor,
and the step contracts over sharded dims (attention, MLP, tied logits). The step uses
`fold_in(rng, step)` for a dropout mask, so sharded random bits are exercised too.

`build_toy()` is the builder the multi-host worker imports by name ("helpers.toy_steps:build_toy"):
it returns `(state, step_fn, batches)` with host arrays identical on every process.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

VOCAB, WIDTH, HEADS, SEQ = 32, 16, 4, 8


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, h):
        b, t, _ = h.shape
        dh = WIDTH // HEADS
        q, k, v = (nn.DenseGeneral((HEADS, dh), name=n)(h) for n in "qkv")  # [B, T, H, Dh]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
        return nn.DenseGeneral(WIDTH, axis=(-2, -1), name="o")(att)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.Dense(WIDTH, name="down")(jax.nn.gelu(nn.Dense(4 * WIDTH, name="up")(h)))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + _Attention(name="attn")(nn.LayerNorm(name="attn_norm")(x))
        return x + _MLP(name="mlp")(nn.LayerNorm(name="mlp_norm")(x))


class ToyGPT(nn.Module):
    """One pre-LN transformer block with the decoder's names and tied output embeddings."""

    @nn.compact
    def __call__(self, tokens, rng_dropout):
        embed = nn.Embed(VOCAB, WIDTH, name="embed")
        positions = jnp.arange(tokens.shape[1])
        x = embed(tokens) + nn.Embed(SEQ, WIDTH, name="pos_embed")(positions)[None]
        keep = jax.random.bernoulli(rng_dropout, 0.9, x.shape)
        x = jnp.where(keep, x / 0.9, 0.0)
        x = _Block(name="layers_0")(x)
        return embed.attend(nn.LayerNorm(name="final_norm")(x))  # [B, T, V]


OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, eps=1e-4))


def init_state(seed: int = 0):
    """Train state {params, opt_state, step, rng, frozen} as host numpy arrays.

    Built with NumPy from `jax.eval_shape` shapes: an eager or jitted Flax init would spend
    seconds compiling on a loaded 2-core machine.
    """
    tokens = jax.ShapeDtypeStruct((1, SEQ), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    shapes = jax.eval_shape(lambda k, t: ToyGPT().init(k, t, k)["params"], key, tokens)
    rs = np.random.RandomState(seed)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        return (rs.randn(*leaf.shape) * (0.01 if "bias" in name else 0.3)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(init, shapes)
    opt_shapes = jax.eval_shape(OPTIMIZER.init, params)  # AdamW starts at zeros
    return {
        "params": params,
        "opt_state": jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), opt_shapes),
        "step": np.int32(0),
        "rng": np.array([0, seed + 1], np.uint32),  # jax.random.PRNGKey(seed + 1)
        "frozen": jax.tree.map(lambda x: x * 0.5, params),  # a reference-model-like subtree
    }


def train_step(state, batch):
    """Next-token cross-entropy plus a KL-like pull to the frozen params; one AdamW update."""
    rng = jax.random.fold_in(state["rng"], state["step"])

    def loss_fn(params):
        logits = ToyGPT().apply({"params": params}, batch["tokens"], rng)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:])
        mask = batch["mask"][:, 1:]
        pull = sum(
            jnp.sum((a - b) ** 2)
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["frozen"]))
        )
        return (ce * mask).sum() / jnp.maximum(mask.sum(), 1) + 1e-3 * pull

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = OPTIMIZER.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
    }
    return new, metrics


def make_batch(index: int, batch_size: int = 8, seed: int = 0):
    """Deterministic batch number `index`: random tokens, ragged right-padding mask."""
    rs = np.random.RandomState([seed, index])
    tokens = rs.randint(0, VOCAB, (batch_size, SEQ)).astype(np.int32)
    lengths = rs.randint(2, SEQ + 1, (batch_size,))
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    return {"tokens": tokens * mask, "mask": mask}


def build_toy(num_steps: int = 3, batch_size: int = 8):
    """Builder for tests/helpers/multihost_worker.py: (state, step_fn, global batches)."""
    return init_state(0), train_step, [make_batch(i, batch_size) for i in range(num_steps)]
