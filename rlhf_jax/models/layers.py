"""The building blocks of the decoder (`models.transformer`): projections, norms, the MLP, RoPE
and the soft-cap, each configured by `TransformerConfig` (no code path looks at the family name).

Dtype policy: parameters float32; matmuls in `config.dtype`; norm statistics and RoPE angles in
float32.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.projection import Projection

INIT_STD = 0.02  # GPT-2 / HF initializer_range


def residual_std(cfg: TransformerConfig) -> float:
    return INIT_STD / (2 * cfg.n_layers) ** 0.5  # GPT-2's scaled init of residual projections


def dense(features, cfg: TransformerConfig, name: str, *, bias: bool, axis=-1, std=INIT_STD):
    features = features if isinstance(features, tuple) else (features,)
    in_axes = len(axis) if isinstance(axis, tuple) else 1
    return Projection(features, in_axes, use_bias=bias, dtype=cfg.compute_dtype, std=std, name=name)


class RMSNorm(nn.Module):
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


def norm(cfg: TransformerConfig, name: str) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.layer_norm_eps, cfg.norm_offset, cfg.compute_dtype, name=name)
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


def barrier(cfg: TransformerConfig, x):
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


def rope_tables(cfg: TransformerConfig, positions: Array) -> dict[str, tuple[Array, Array]]:
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


def apply_rope(x: Array, rope: tuple[Array, Array], rotary_dim: int) -> Array:
    """Rotates the first `rotary_dim` dims of each head of x [B, T, heads, Dh] (transformers'
    rotate-half convention: pairs (i, i + R/2)), in float32, back to x's dtype."""
    cos, sin = rope
    half = rotary_dim // 2
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    return jnp.concatenate([*rotated, rest], axis=-1).astype(x.dtype)


def softcapped(x, cap):
    """`cap * tanh(x / cap)` (Gemma 2's soft-cap of scores and logits); x itself for cap None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # HF "gelu_new" / "..._tanh"
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact (erf)
    "silu": jax.nn.silu,
}


class MLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = ACTIVATIONS[cfg.activation]
        up = dense(cfg.d_ff, cfg, "up", bias=cfg.mlp_bias)(x)
        if cfg.mlp == "gated":  # SwiGLU / GeGLU
            up = act(dense(cfg.d_ff, cfg, "gate", bias=cfg.mlp_bias)(x)) * up
        else:
            up = act(up)
        return dense(cfg.d_model, cfg, "down", bias=cfg.mlp_bias, std=residual_std(cfg))(up)
