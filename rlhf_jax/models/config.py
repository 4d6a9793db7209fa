"""Configuration of the GPT-2-family decoder: a frozen dataclass and named presets."""

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a GPT-2-architecture decoder.

    `d_ff=None` means `4 * d_model` (resolved at construction, so `config.d_ff` is always an int;
    `dataclasses.replace(cfg, d_model=...)` keeps the old `d_ff` — use `get_config` to re-derive).
    `dtype` is the compute dtype ("float32" or "bfloat16"); parameters are always float32 and
    logits are returned in float32. `remat` rematerialises each block in the backward pass;
    `grad_barrier` is a backward-pass scheduling hint with no effect on any number.
    """

    vocab_size: int = 50257
    max_len: int = 1024  # context length = number of learned positions (HF n_positions)
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int | None = None
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    remat: bool = False
    # Backward-pass scheduling hint at each LayerNorm input (see `transformer._grad_barrier`):
    # an identity whose cotangent goes through `lax.optimization_barrier`. It speeds up
    # reverse-mode training steps on XLA:CPU; turn it off for forward-mode AD (jax.jvp, jacfwd,
    # hessian), which a custom_vjp function does not support.
    grad_barrier: bool = True
    # Attention kernel of full forward passes (training, scoring): "xla" (any backend) or "cudnn"
    # (cuDNN's fused flash attention through jax.nn.dot_product_attention; NVIDIA GPUs only, and
    # bfloat16 compute) for unpadded and right-padded batches, other padding falling back to XLA
    # at run time. Decoding against a KV cache always uses the XLA path.
    attention: str = "xla"

    def __post_init__(self):
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.attention not in ("xla", "cudnn"):
            raise ValueError(f"attention must be 'xla' or 'cudnn', got {self.attention!r}")
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ValueError(
                "attention='cudnn' needs dtype='bfloat16' (cuDNN's fused attention has no "
                f"float32 kernel); got dtype={self.dtype!r}: set dtype='bfloat16' or "
                "attention='xla'"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


PRESETS: dict[str, dict] = {
    "gpt2": dict(vocab_size=50257, max_len=1024, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(vocab_size=50257, max_len=1024, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(vocab_size=50257, max_len=1024, d_model=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(vocab_size=50257, max_len=1024, d_model=1600, n_layers=48, n_heads=25),
    "tiny": dict(vocab_size=1024, max_len=128, d_model=64, n_layers=2, n_heads=4),
    "small": dict(vocab_size=2048, max_len=256, d_model=256, n_layers=4, n_heads=4),
}


def get_config(name: str, **overrides) -> TransformerConfig:
    """The preset `name` with `overrides` applied (`d_ff` follows `d_model` unless overridden)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return TransformerConfig(**{**PRESETS[name], **overrides})
