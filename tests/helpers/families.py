"""Tiny Hugging Face models of every supported family, built from random initialisation.

Shapes that stress each family: grouped-query attention with ratio 3 (6 query heads, 2 kv heads),
a head_dim (16) that is not hidden / heads (48 / 6), a sliding window (5) shorter than the test
sequences, an odd vocabulary (211), RoPE scalings (llama3, linear, partial rotary), soft-caps small
enough to bite. Every weight is re-drawn away from its init (norm scales and biases shifted,
matrices N(0, 0.1)), so a missing norm scale, bias or mis-mapped tensor cannot hide.
"""

import functools

import jax
import numpy as np

from rlhf_jax import models

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, WINDOW, LAYERS, CONTEXT = (
    211, 48, 6, 2, 16, 72, 5, 2, 64,
)  # fmt: skip

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, max_position_embeddings=CONTEXT, bos_token_id=None,
    eos_token_id=None, pad_token_id=None,
)  # fmt: skip
_GQA = dict(num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)

# family -> (transformers config class name, kwargs)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(
        **_COMMON, **_GQA, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True,
        mlp_bias=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=32,
        ),
    )),
    "mistral": ("MistralConfig", dict(**_COMMON, **_GQA, sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(
        **_COMMON, num_key_value_heads=KV_HEADS, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=1, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0),
    )),
    "qwen3": ("Qwen3Config", dict(**_COMMON, **_GQA, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(
        **_COMMON, **_GQA, query_pre_attn_scalar=24, sliding_window=WINDOW,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
    )),
    "gemma3_text": ("Gemma3TextConfig", dict(
        **_COMMON, **_GQA, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            "full_attention": dict(rope_type="linear", rope_theta=100000.0, factor=8.0),
        },
    )),
    "gpt_neox": ("GPTNeoXConfig", dict(
        **_COMMON, layer_norm_eps=1e-5, use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
    )),
    "gpt2": ("GPT2Config", dict(
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )),
}  # fmt: skip
FAMILIES = list(FAMILY_CONFIGS)


def hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of `family` (eager attention, eval mode), perturbed."""
    import torch
    import transformers

    name, kwargs = FAMILY_CONFIGS[family]
    config = getattr(transformers, name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm scales and biases
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


def save_hf(family: str, path, seed: int = 0, **overrides):
    """`hf_model(family, seed)` saved as safetensors under `path`; returns the model."""
    model = hf_model(family, seed, **overrides)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def hf_logits(model, tokens, mask=None, positions=None) -> np.ndarray:
    import torch

    kwargs = {"input_ids": torch.as_tensor(np.asarray(tokens), dtype=torch.long)}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    with torch.inference_mode():
        return model(**kwargs).logits.float().numpy()


def left_padded(tokens: np.ndarray, lengths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of `tokens` cut to `lengths` and left-padded with 0: (tokens, mask, positions)."""
    out, mask = np.zeros_like(tokens), np.zeros_like(tokens)
    t = tokens.shape[1]
    for i, n in enumerate(lengths):
        out[i, t - n :], mask[i, t - n :] = tokens[i, :n], 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return out, mask, positions


TOL = 1e-4  # logits against transformers, float32
T = 16  # sequence length of the tests: more than 3 windows


@functools.partial(jax.jit, static_argnums=0)
def logits(config, params, tokens, mask=None):
    """Our logits [B, T, V] (jitted per config)."""
    return models.Transformer(config).apply({"params": params}, tokens, mask)


def checkpoints(tmp_path_factory):
    """`get(family) -> (transformers model, its folder)`, each built and saved once (the body of
    the test modules' module-scoped `checkpoint` fixture)."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[family] = (save_hf(family, path, seed=FAMILIES.index(family)), str(path))
        return cache[family]

    return get
