"""Configuration of the decoder: one frozen dataclass for every family, and named presets.

One `TransformerConfig` describes GPT-2, Llama 3, Mistral, Qwen 2/3, Gemma 2/3 and GPT-NeoX
(Pythia): the family only sets fields (norm kind, positions, MLP kind, biases, GQA, RoPE, sliding
windows, soft-caps, ...), and `models.Transformer` reads the fields, never the family name. The
family is kept so that `save_pretrained` writes the matching Hugging Face folder.

Presets: tiny random-init shapes for tests and the offline task ("tiny", "small"), the GPT-2
sizes, and the published shapes of the models people align today (`get_config("llama-3.1-8b")`):
configs only, no weights, for planning and benchmarks.
"""

import dataclasses

import jax.numpy as jnp

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_neox")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu")
LAYER_TYPES = ("full_attention", "sliding_attention")
REMAT = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of a decoder-only transformer.

    Shape: `d_ff=None` means `4 * d_model`, `n_kv_heads=None` means `n_heads` (no GQA) and
    `head_dim=None` means `d_model // n_heads`; all three are resolved at construction, so they are
    always ints (`dataclasses.replace(cfg, d_model=...)` keeps the old values: use `get_config`).

    Numerics: `dtype` is the compute dtype ("float32" or "bfloat16"); parameters are always
    float32, the residual stream, norm statistics, attention softmax and logits float32. `remat`
    rematerialises each block in the backward pass (a policy: "none", "full", "dots");
    `logits_chunk` computes target log-probs in chunks of positions; `scan_layers` runs the
    blocks as one `lax.scan` over the layers; `grad_barrier` is a backward-pass scheduling hint.
    None of them changes a number beyond float32 round-off.

    Architecture (set by the family; every field is read from the HF config.json):
      family: the Hugging Face `model_type` written by `save_pretrained`.
      norm: "layernorm" (with bias: GPT-2, NeoX) or "rmsnorm"; `norm_offset` scales by (1 + w)
        (Gemma), `layer_norm_eps` is the epsilon of every norm.
      positions: "learned" (GPT-2: `max_len` rows) or "rope".
      rope_*: RoPE base, scaling ("default", "linear" with `rope_factor`, "llama3" with
        `rope_factor`, `rope_low_freq_factor`, `rope_high_freq_factor`, `rope_original_max_len`),
        `rotary_fraction` (NeoX's partial rotary: the first fraction of each head is rotated) and
        `rope_local_theta` (Gemma 3: the base of sliding-window layers, unscaled).
      mlp: "gated" (SwiGLU / GeGLU: down(act(gate(x)) * up(x))) or "plain" (down(act(up(x)))),
        `activation` "gelu_tanh", "gelu" (exact) or "silu".
      qkv_bias, out_bias, mlp_bias: biases of the q/k/v, output and MLP projections.
      qk_norm: RMSNorm of each query and key head before RoPE (Qwen 3, Gemma 3).
      post_norms: norms of the attention and MLP outputs before the residual add (Gemma 2/3).
      parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX).
      embed_scale: embeddings multiplied by sqrt(d_model) (Gemma).
      tie_embeddings: logits = h @ embed.T (else a separate `lm_head`).
      attn_scale: the query scale (None: head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5).
      attn_softcap, final_softcap: cap * tanh(x / cap) on attention scores / logits (Gemma 2).
      sliding_window: W, a query sees itself and the W - 1 keys before it, on the layers whose
        `layer_types` entry is "sliding_attention" (`layer_types=None`: every layer sliding when
        W is set, as Mistral).
    """

    vocab_size: int = 50257
    max_len: int = 1024  # context length (GPT-2: the number of learned positions)
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int | None = None
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    # Rematerialisation of each decoder block in the backward pass: "none", "full" (keep only
    # the block's input) or "dots" (keep the matmul outputs without batch dimensions:
    # `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`). True / False mean "full" /
    # "none".
    remat: bool | str = "none"
    # Log-probs of the targets over the vocabulary in chunks of this many positions (None: all at
    # once), each chunk's logits recomputed in the backward pass: no [B, T, V] float32 logits
    # tensor is held by the steps (`train.logps`: SFT, the DPO family, PPO, critic-free).
    logits_chunk: int | None = None
    # Run the decoder blocks of full forward passes (training, scoring) as one `lax.scan` over
    # the layers, grouped by their repeating pattern (Gemma 2's sliding/global pairs): XLA then
    # sees one block, so each step gathers, holds and frees one layer's FSDP-split weights at a
    # time and compiles in a time independent of depth. The per-layer parameters are stacked in
    # the step (one extra copy of the blocks' weights, split like them); the parameter tree and
    # every checkpoint are unchanged. Decoding against a KV cache stays unrolled.
    scan_layers: bool = False
    # Backward-pass scheduling hint at each norm input (see `layers.barrier`): an
    # identity whose cotangent goes through `lax.optimization_barrier`. It speeds up reverse-mode
    # training steps on XLA:CPU; turn it off for forward-mode AD (jax.jvp, jacfwd, hessian), which
    # a custom_vjp function does not support.
    grad_barrier: bool = True
    # Attention kernel of full forward passes (training, scoring): "xla" (any backend) or "cudnn"
    # (cuDNN's fused flash attention through jax.nn.dot_product_attention; NVIDIA GPUs only, and
    # bfloat16 compute) for unpadded and right-padded batches, other padding falling back to XLA
    # at run time; layers with a sliding window or a soft-cap always take XLA. Decoding against a
    # KV cache always uses the XLA path.
    attention: str = "xla"
    # --- architecture (defaults: GPT-2) ---
    family: str = "gpt2"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm: str = "layernorm"
    norm_offset: bool = False
    positions: str = "learned"
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rotary_fraction: float = 1.0
    rope_local_theta: float | None = None
    mlp: str = "plain"
    activation: str = "gelu_tanh"
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    qk_norm: bool = False
    post_norms: bool = False
    parallel_residual: bool = False
    embed_scale: bool = False
    tie_embeddings: bool = True
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.logits_chunk is not None and self.logits_chunk < 1:
            raise ValueError(
                f"logits_chunk must be >= 1 (positions per chunk) or None (off), got "
                f"{self.logits_chunk}"
            )
        choices = [
            ("remat", REMAT),
            ("dtype", ("float32", "bfloat16")),
            ("attention", ("xla", "cudnn")),
            ("family", FAMILIES),
            ("norm", ("layernorm", "rmsnorm")),
            ("positions", ("learned", "rope")),
            ("rope_type", ROPE_TYPES),
            ("mlp", ("plain", "gated")),
            ("activation", ACTIVATIONS),
        ]
        for name, ok in choices:
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {getattr(self, name)!r}")
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ValueError(
                "attention='cudnn' needs dtype='bfloat16' (cuDNN's fused attention has no "
                f"float32 kernel); got dtype={self.dtype!r}: set dtype='bfloat16' or "
                "attention='xla'"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.positions == "rope":
            rot = self.rotary_dim
            if rot < 2 or rot % 2 or rot > self.head_dim:
                raise ValueError(
                    f"rotary_fraction={self.rotary_fraction} of head_dim={self.head_dim} gives "
                    f"{rot} rotated dims; need an even number in [2, head_dim]"
                )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(
                    f"layer_types must list one of {LAYER_TYPES} per layer ({self.n_layers}), "
                    f"got {self.layer_types}"
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window=None")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (NeoX's partial rotary: int(head_dim * rotary_fraction))."""
        return int(self.head_dim * self.rotary_fraction)

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def rope_key(self, layer: int) -> str:
        """Which RoPE table layer `layer` uses: "local" (Gemma 3's sliding layers) or "global"."""
        if self.rope_local_theta is not None and self.window(layer) is not None:
            return "local"
        return "global"

    def matmul_params(self) -> int:
        """N of the model-FLOPs convention (PaLM, appendix B): the parameters that enter matmuls,
        i.e. the attention and MLP projections of every block plus the output layer (embedding
        lookups, position embeddings, norms and biases excluded)."""
        d, f, h, k, dh = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim
        block = d * dh * (h + 2 * k) + h * dh * d + (3 if self.mlp == "gated" else 2) * d * f
        return self.n_layers * block + self.vocab_size * d

    def flops_per_token(self, seq_len: int, *, backward: bool = True) -> float:
        """Model FLOPs per token of a forward (2N + 4 L T H Dh) or forward + backward
        (6N + 12 L T H Dh) pass over sequences of `seq_len` (causal attention counted as full)."""
        attn = self.n_layers * seq_len * self.n_heads * self.head_dim
        n = self.matmul_params()
        return 6.0 * n + 12.0 * attn if backward else 2.0 * n + 4.0 * attn

    def num_params(self) -> int:
        """Parameter count of the language model (embeddings counted once when tied)."""
        d, f, h, k, dh = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim
        norm = d * (2 if self.norm == "layernorm" else 1)
        attn = d * dh * (h + 2 * k) + h * dh * d
        attn += (dh * (h + 2 * k) if self.qkv_bias else 0) + (d if self.out_bias else 0)
        attn += 2 * dh if self.qk_norm else 0
        mlp = (3 if self.mlp == "gated" else 2) * d * f
        mlp += ((2 if self.mlp == "gated" else 1) * f + d) if self.mlp_bias else 0
        block = attn + mlp + norm * (4 if self.post_norms else 2)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        emb += self.max_len * d if self.positions == "learned" else 0
        return self.n_layers * block + emb + norm


_GPT2 = dict(family="gpt2")
_LLAMA = dict(
    family="llama", norm="rmsnorm", positions="rope", mlp="gated", activation="silu",
    qkv_bias=False, out_bias=False, mlp_bias=False, layer_norm_eps=1e-5,
)  # fmt: skip
_LLAMA3_ROPE = dict(
    rope_theta=500000.0, rope_type="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0, rope_original_max_len=8192,
)  # fmt: skip
_QWEN2 = {**_LLAMA, "family": "qwen2", "qkv_bias": True, "layer_norm_eps": 1e-6}
_QWEN3 = {**_LLAMA, "family": "qwen3", "qk_norm": True, "layer_norm_eps": 1e-6}
_GEMMA2 = dict(
    family="gemma2", norm="rmsnorm", norm_offset=True, positions="rope", mlp="gated",
    activation="gelu_tanh", qkv_bias=False, out_bias=False, mlp_bias=False, post_norms=True,
    embed_scale=True, layer_norm_eps=1e-6, attn_softcap=50.0, final_softcap=30.0,
)  # fmt: skip
_NEOX = dict(
    family="gpt_neox", positions="rope", rotary_fraction=0.25, activation="gelu",
    parallel_residual=True, tie_embeddings=False,
)  # fmt: skip


def _alternating(n_layers: int, period: int) -> tuple[str, ...]:
    """Gemma's pattern: every `period`-th layer is global, the others sliding."""
    return tuple(
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)
    )


PRESETS: dict[str, dict] = {
    "gpt2": dict(vocab_size=50257, max_len=1024, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(vocab_size=50257, max_len=1024, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(vocab_size=50257, max_len=1024, d_model=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(vocab_size=50257, max_len=1024, d_model=1600, n_layers=48, n_heads=25),
    "tiny": dict(vocab_size=1024, max_len=128, d_model=64, n_layers=2, n_heads=4),
    "small": dict(vocab_size=2048, max_len=256, d_model=256, n_layers=4, n_heads=4),
    # Published shapes (the Hugging Face config.json of each model; no weights).
    "pythia-2.8b": dict(
        **_NEOX, vocab_size=50304, max_len=2048, d_model=2560, n_layers=32, n_heads=32,
        d_ff=10240,
    ),
    "llama-3.2-1b": dict(
        **_LLAMA, **_LLAMA3_ROPE, vocab_size=128256, max_len=131072, d_model=2048, n_layers=16,
        n_heads=32, n_kv_heads=8, head_dim=64, d_ff=8192, tie_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        **_LLAMA, **{**_LLAMA3_ROPE, "rope_factor": 8.0}, vocab_size=128256, max_len=131072,
        d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, tie_embeddings=False,
    ),
    "llama-3.1-70b": dict(
        **_LLAMA, **{**_LLAMA3_ROPE, "rope_factor": 8.0}, vocab_size=128256, max_len=131072,
        d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672, tie_embeddings=False,
    ),
    "qwen2.5-0.5b": dict(
        **_QWEN2, vocab_size=151936, max_len=32768, d_model=896, n_layers=24, n_heads=14,
        n_kv_heads=2, d_ff=4864, rope_theta=1000000.0, tie_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        **_QWEN2, vocab_size=152064, max_len=32768, d_model=3584, n_layers=28, n_heads=28,
        n_kv_heads=4, d_ff=18944, rope_theta=1000000.0, tie_embeddings=False,
    ),
    "qwen3-8b": dict(
        **_QWEN3, vocab_size=151936, max_len=40960, d_model=4096, n_layers=36, n_heads=32,
        n_kv_heads=8, head_dim=128, d_ff=12288, rope_theta=1000000.0, tie_embeddings=False,
    ),
    "gemma-2-2b": dict(
        **_GEMMA2, vocab_size=256000, max_len=8192, d_model=2304, n_layers=26, n_heads=8,
        n_kv_heads=4, head_dim=256, d_ff=9216, attn_scale=256**-0.5, sliding_window=4096,
        layer_types=_alternating(26, 2),
    ),
    "gemma-2-9b": dict(
        **_GEMMA2, vocab_size=256000, max_len=8192, d_model=3584, n_layers=42, n_heads=16,
        n_kv_heads=8, head_dim=256, d_ff=14336, attn_scale=256**-0.5, sliding_window=4096,
        layer_types=_alternating(42, 2),
    ),
    "mistral-7b": dict(  # Mistral-7B-v0.1: every layer slides over 4096 tokens
        **{**_LLAMA, "family": "mistral"}, vocab_size=32000, max_len=32768, d_model=4096,
        n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, tie_embeddings=False,
        sliding_window=4096,
    ),
}  # fmt: skip

# Tiny random-init shapes of every family (tests, CPU bench rows): GQA, head_dim != d/heads,
# windows shorter than a test sequence.
PRESETS.update(
    {
        "llama-tiny": dict(
            **_LLAMA, **{**_LLAMA3_ROPE, "rope_theta": 10000.0, "rope_original_max_len": 64},
            vocab_size=1024, max_len=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2,
            head_dim=16, d_ff=160, tie_embeddings=False,
        ),
        "llama-cpu": dict(  # the "cpu" bench size, llama-shaped (GQA 4:1, untied, llama3 RoPE)
            **_LLAMA, **_LLAMA3_ROPE, vocab_size=1024, max_len=8192, d_model=256, n_layers=4,
            n_heads=8, n_kv_heads=2, d_ff=704, tie_embeddings=False,
        ),
        "gemma2-tiny": dict(
            **_GEMMA2, vocab_size=1024, max_len=256, d_model=64, n_layers=2, n_heads=8,
            n_kv_heads=2, head_dim=16, d_ff=160, attn_scale=16**-0.5, sliding_window=8,
            layer_types=_alternating(2, 2),
        ),
    }
)  # fmt: skip


# Presets whose layer types follow Gemma's pattern (every `period`-th layer global): their
# `layer_types` are re-derived when `n_layers` is overridden.
_LAYER_PERIODS = {"gemma-2-2b": 2, "gemma-2-9b": 2, "gemma2-tiny": 2}


def get_config(name: str, **overrides) -> TransformerConfig:
    """The preset `name` with `overrides` applied (`d_ff` follows `d_model` unless overridden;
    a patterned preset's `layer_types` follow an overridden `n_layers`)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    if name in _LAYER_PERIODS and "layer_types" not in overrides:
        fields["layer_types"] = _alternating(fields["n_layers"], _LAYER_PERIODS[name])
    return TransformerConfig(**fields)
