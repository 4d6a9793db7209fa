"""The decoder's linear projections (attention q/k/v/o, MLP gate/up/down): `nn.DenseGeneral`'s
computation and parameters, plus optional LoRA adapters read from the "lora" collection.

    y = x · W (+ bias)                                       params: kernel, bias
    y = x · W (+ bias) + scale · (drop(x) · A) · B           + lora: a, b, scale (, dropout)

A projection without "lora" variables is exactly `nn.DenseGeneral` (same parameter names,
shapes, initialisation and arithmetic), so every checkpoint and HF map is unchanged. The
adapters live in their own collection (`rlhf_jax.lora` builds it), so the base model is the
same `apply` with that collection left out: no second copy of the weights.

The kernel may instead be stored quantized (QLoRA: `kernel_int8` + `kernel_scale`, or
`kernel_nf4` + `kernel_absmax`; `models.quant`), dequantized here on every call.

A: the kernel's input axes then r ([D, r] for q/k/v/gate/up, [H, Dh, r] for o, [F, r] for
down); B: r then the kernel's output axes ([r, H, Dh], [r, D], ...), so the partition rules keep
whole heads. Dropout on the adapter's input applies only when the call has a "lora_dropout" rng.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from rlhf_jax.models.quant import QUANT_LEAVES, dequantize_kernel

LORA = "lora"  # the variable collection of the adapters
LORA_DROPOUT_RNG = "lora_dropout"


class Projection(nn.Module):
    """`nn.DenseGeneral(features, axis)` with an optional LoRA adapter (see the module doc).

    Attributes:
      features: output feature shape.
      in_axes: how many trailing input axes are contracted (1, or 2 for the attention output
        [.., H, Dh]).
      use_bias: add a bias of shape `features`.
      dtype: computation dtype (inputs, kernel and adapters are cast to it).
      std: standard deviation of the kernel's normal initialisation.
    """

    features: tuple[int, ...]
    in_axes: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    std: float = 0.02

    @nn.compact
    def __call__(self, x):
        n_in = self.in_axes
        in_shape = x.shape[x.ndim - n_in :]
        init = nn.initializers.normal(self.std)

        def kernel_init(rng, shape, dtype=jnp.float32):  # DenseGeneral's: flat, then reshaped
            flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
            return jnp.reshape(init(rng, flat, dtype), shape)

        shape = (*in_shape, *self.features)
        quantized = [n for n in QUANT_LEAVES if self.has_variable("params", n)]
        if quantized and not self.is_initializing():  # QLoRA: the base stored int8 / NF4
            leaves = {n: self.get_variable("params", n) for n in quantized}
            kernel = dequantize_kernel(leaves)
        else:
            kernel = self.param("kernel", kernel_init, shape, jnp.float32)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, self.features, jnp.float32)
        x_in, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        axes = tuple(range(x.ndim - n_in, x.ndim))
        y = jax.lax.dot_general(x_in, kernel, ((axes, tuple(range(n_in))), ((), ())))
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (x.ndim - n_in) + self.features)
        if not self.has_variable(LORA, "a"):
            return y
        a = self.get_variable(LORA, "a").astype(y.dtype)  # [*in, r]
        b = self.get_variable(LORA, "b").astype(y.dtype)  # [r, *out]
        scale = self.get_variable(LORA, "scale")
        h = x_in
        if self.has_variable(LORA, "dropout") and self.has_rng(LORA_DROPOUT_RNG):
            rate = jnp.asarray(self.get_variable(LORA, "dropout"), jnp.float32)
            keep = jax.random.bernoulli(self.make_rng(LORA_DROPOUT_RNG), 1.0 - rate, h.shape)
            h = jnp.where(keep, h / jnp.maximum(1.0 - rate, 1e-6), 0).astype(h.dtype)
        z = jax.lax.dot_general(h, a, ((axes, tuple(range(n_in))), ((), ())))  # [..., r]
        delta = jax.lax.dot_general(z, b, (((z.ndim - 1,), (0,)), ((), ())))  # [..., *out]
        return y + jnp.asarray(scale, y.dtype) * delta
