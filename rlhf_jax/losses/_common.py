"""What every loss module shares (public names in a private module: import them only from
`rlhf_jax.losses.*`): the float32 cast, masked reductions and the `Scalar` hyperparameter type.

Masks are 0/1 arrays of any numeric or bool dtype; a position is "in" iff its mask entry is
nonzero. Masked reductions use `jnp.where` rather than multiplication so that non-finite values at
masked-out positions (e.g. `-inf` log-probs of padding) never leak into results or gradients.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Real, Shaped

# A hyper-parameter that may be a Python number or a (possibly traced) 0-d array, so that callers
# can vmap over it (e.g. DPO over beta).
Scalar = Real[ArrayLike, ""]
# Array inputs are annotated ArrayLike (jax or NumPy arrays are accepted), outputs are jax Arrays.


def f32(x: ArrayLike) -> Array:
    """Any array-like (jax, NumPy, Python number; any float dtype) -> float32 jax array."""
    return jnp.asarray(x, jnp.float32)


def bool_mask(mask: Shaped[ArrayLike, "..."]) -> Shaped[Array, "..."]:
    """Any-dtype 0/1 mask -> bool mask (nonzero is in)."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def masked_sum(x: Float[ArrayLike, "..."], mask: Shaped[ArrayLike, "..."], axis=None) -> Array:
    """Sum of `x` over positions where `mask` is nonzero (where-select, not multiply)."""
    return jnp.sum(jnp.where(bool_mask(mask), x, 0.0), axis=axis)


def mask_count(mask: Shaped[ArrayLike, "..."], axis=None) -> Array:
    """Number of nonzero mask entries, as float32."""
    return jnp.sum(bool_mask(mask), axis=axis, dtype=jnp.float32)


def masked_mean(x: Float[ArrayLike, "..."], mask: Shaped[ArrayLike, "..."], axis=None) -> Array:
    """Masked mean; divides by max(count, 1), so an empty mask gives 0."""
    return masked_sum(x, mask, axis) / jnp.maximum(mask_count(mask, axis), 1.0)
