"""The tiny decoder that the step tests train, defined once.

The conftest fixtures (`tiny_config`, `tiny_model`, `tiny_params`, the `tiny(...)` factory) build
on `config`; module-level helpers that no fixture reaches (batch builders, reference losses,
`pytest.mark.parametrize` arguments) call it too and get the same object.
"""

import functools

from rlhf_jax.models import TransformerConfig, get_config

# The "tiny" preset cut down: 1 layer, 2 heads, d_model 32, a 48-token vocabulary, 32 positions.
SHAPES = dict(vocab_size=48, max_len=32, d_model=32, n_layers=1, n_heads=2)


@functools.cache
def config(**overrides) -> TransformerConfig:
    """The tiny config with `overrides` of SHAPES (e.g. `n_layers=2`); a frozen dataclass, one
    object per set of overrides."""
    return get_config("tiny", **{**SHAPES, **overrides})


def jitter(tree, seed: int, scale: float = 1.0):
    """Every leaf plus `scale` × (its RMS + 0.02) × N(0, 1) noise from `key(seed)`: a policy with
    logits of O(1), so that temperatures, ratios and KLs move visibly."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            x + scale * (jnp.sqrt(jnp.mean(jnp.square(x))) + 0.02) * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, keys)
        ],
    )
