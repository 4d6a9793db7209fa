"""Quantized storage of projection kernels for QLoRA (Dettmers et al. 2023): int8 with one absmax
scale per output channel, or NF4 (4-bit NormalFloat) with one absmax per block of 64 weights.
A quantized kernel is dequantized inside the forward (`models.projection.Projection`), so the
base costs 1 byte (int8) or about 0.53 bytes (NF4) per weight in memory.

    leaves = quantize_kernel(w, "nf4", n_in=1)   # {"kernel_nf4": uint8, "kernel_absmax": f32}
    w_hat = dequantize_kernel(leaves)           # float32, the shape of w

In a parameter tree the quantized leaves replace the projection's `kernel`: `kernel_int8` (the
kernel's shape, so the partition rules split it like the kernel) with `kernel_scale`, or
`kernel_nf4` (the kernel's shape with its last axis halved: split like the kernel) with
`kernel_absmax` (flat, replicated).

int8: `codes[..., j] = round(w[..., j] / s_j)` in [-127, 127] with `s_j = max_i |w[i, j]| / 127`
over the input axes (per output channel; stored int8 as the kernel's shape). NF4: the kernel,
flattened in row-major order, is cut into blocks of 64; each block is scaled by its absmax into
[-1, 1] and each value replaced by the nearest of the 16 NF4 levels (QLoRA's Appendix E table),
two 4-bit codes per byte (neighbours along the last axis).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

MODES = ("int8", "nf4")
NF4_BLOCK = 64
# QLoRA's NF4 levels (bitsandbytes' table): quantiles of N(0, 1) normalised to [-1, 1], with an
# exact zero.
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip


QUANT_LEAVES = ("kernel_int8", "kernel_scale", "kernel_nf4", "kernel_absmax")


def is_quantized(module_params: Any) -> bool:
    return isinstance(module_params, dict) and (
        "kernel_int8" in module_params or "kernel_nf4" in module_params
    )


def quantize_kernel(w: Any, mode: str, *, n_in: int = 1) -> dict[str, Any]:
    """The quantized leaves of one kernel `w` [*in, *out] (`n_in` input axes).

    Returns:
      int8: {"kernel_int8": int8 [*in, *out], "kernel_scale": f32 [*out]}; nf4: {"kernel_nf4":
      uint8, the kernel's shape with the last axis halved, "kernel_absmax": f32 [n / 64]} with
      n = w.size (a multiple of 64).
    Raises:
      ValueError: an unknown mode, or an NF4 kernel whose size is not a multiple of 64.
    """
    w = jnp.asarray(w, jnp.float32)
    if mode == "int8":
        scale = jnp.max(jnp.abs(w), axis=tuple(range(n_in))) / 127.0  # [*out]
        safe = jnp.where(scale > 0, scale, 1.0)
        codes = jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8)
        return {"kernel_int8": codes, "kernel_scale": scale}
    if mode == "nf4":
        if w.size % NF4_BLOCK or w.shape[-1] % 2:
            raise ValueError(
                f"NF4 needs a kernel size divisible by {NF4_BLOCK} and an even last axis, got "
                f"{w.shape}"
            )
        blocks = w.reshape(-1, NF4_BLOCK)
        absmax = jnp.max(jnp.abs(blocks), axis=1)  # [n / 64]
        normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
        idx = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1)
        idx = idx.reshape(-1).astype(jnp.uint8)
        packed = (idx[0::2] << 4) | idx[1::2]  # two codes per byte, high nibble first
        packed = packed.reshape(*w.shape[:-1], w.shape[-1] // 2)  # the kernel's, last axis / 2
        return {"kernel_nf4": packed, "kernel_absmax": absmax}
    raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")


def kernel_shape(q: dict[str, Any]) -> tuple[int, ...]:
    """The float kernel's shape, from its quantized leaves."""
    if "kernel_int8" in q:
        return tuple(q["kernel_int8"].shape)
    codes = q["kernel_nf4"].shape
    return (*codes[:-1], 2 * codes[-1])


def dequantize_kernel(q: dict[str, Any], dtype: Any = jnp.float32) -> Any:
    """The float kernel of `quantize_kernel`'s leaves."""
    if "kernel_int8" in q:
        return (q["kernel_int8"].astype(jnp.float32) * q["kernel_scale"]).astype(dtype)
    shape = kernel_shape(q)
    packed = q["kernel_nf4"].reshape(-1)
    idx = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)  # [n]
    values = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)].reshape(-1, NF4_BLOCK)
    return (values * q["kernel_absmax"][:, None]).reshape(shape).astype(dtype)


def quantized_bytes(shape: tuple[int, ...], mode: str, n_in: int = 1) -> int:
    """Bytes of one quantized kernel of `shape` (codes and scales)."""
    n = math.prod(shape)
    if mode == "int8":
        return n + 4 * math.prod(shape[n_in:])
    return n // 2 + 4 * (n // NF4_BLOCK)
