"""Hugging Face checkpoints in and out, for every family: a folder (local, or a cloud URL such
as gs://, through `rlhf_jax.paths`) with config.json and model.safetensors (or a sharded
model.safetensors.index.json).

No network and no torch: `safetensors` (NumPy) and `json` only. `from_pretrained` dispatches on
config.json's `model_type` (gpt2, llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gpt_neox),
reads every architecture field into one `TransformerConfig` (legacy `rope_scaling` / `rope_theta`
/ `rotary_pct` keys and transformers 5's `rope_parameters` alike) and maps the family's tensors
onto the one parameter layout of `transformer.py` through the family's tensor map
(`models.hf_map`).

`save_pretrained` writes the inverse, with a config.json that `transformers` reads back to the same
architecture (checked: the written config is parsed again and must give the same fields).
"""

import json
import math
from typing import Any

import jax
import numpy as np

from rlhf_jax import paths
from rlhf_jax.models import hf_map
from rlhf_jax.models.config import FAMILIES, TransformerConfig
from rlhf_jax.models.transformer import init_params

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
}
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}
# Architecture fields compared when a written config.json is read back.
_ARCH_FIELDS = (
    "vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ff", "layer_norm_eps",
    "family", "n_kv_heads", "head_dim", "norm", "norm_offset", "positions", "rope_theta",
    "rope_type", "rope_factor", "rotary_fraction", "rope_local_theta", "mlp", "activation",
    "qkv_bias", "out_bias", "mlp_bias", "qk_norm", "post_norms", "parallel_residual",
    "embed_scale", "tie_embeddings", "attn_scale", "attn_softcap", "final_softcap",
    "sliding_window", "layer_types",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# config.json -> TransformerConfig


def _activation(hf: dict, default: str) -> str:
    name = hf.get("hidden_activation") or hf.get("hidden_act") or hf.get("activation_function")
    name = name or default
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (supported: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _rope_fields(hf: dict, family: str) -> dict:
    """RoPE fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    default_theta = 1_000_000.0 if family == "gemma3_text" else 10000.0
    local = None
    if isinstance(params, dict) and "full_attention" in params:  # per layer type (Gemma 3)
        local_params = params.get("sliding_attention") or {}
        if local_params.get("rope_type", "default") != "default":
            raise ValueError("only unscaled RoPE is supported on sliding layers")
        local = local_params.get("rope_theta")
        params = params["full_attention"]
    if family == "gemma3_text" and local is None:
        local = hf.get("rope_local_base_freq", 10000.0)
    scaling = dict(params or hf.get("rope_scaling") or {})
    theta = scaling.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base")))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    fraction = scaling.get(
        "partial_rotary_factor",
        hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25 if family == "gpt_neox" else 1)),
    )
    out = {
        "rope_theta": float(default_theta if theta is None else theta),
        "rope_type": rope_type,
        "rotary_fraction": float(fraction),
        "rope_local_theta": None if local is None else float(local),
    }
    if rope_type == "linear":
        out["rope_factor"] = float(scaling["factor"])
    elif rope_type == "llama3":
        out.update(
            rope_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_max_len=int(scaling["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ValueError(
            f"unsupported RoPE type {rope_type!r} (supported: default, linear, llama3)"
        )
    return out


def _gpt2_config(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if _ACTIVATIONS.get(act) != "gelu_tanh":
        raise ValueError(f"unsupported GPT-2 activation_function {act!r} (need a tanh GELU)")
    for key, ok in [
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("tie_word_embeddings", True),
    ]:
        if hf.get(key, ok) != ok:
            raise ValueError(f"unsupported GPT-2 variant: {key}={hf[key]}")
    d = hf["n_embd"]
    return dict(
        family="gpt2", vocab_size=hf["vocab_size"], max_len=hf.get("n_positions", hf.get("n_ctx")),
        d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )  # fmt: skip


def _neox_config(hf: dict) -> dict:
    bias = hf.get("attention_bias", True)
    return dict(
        family="gpt_neox", vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
        d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5), positions="rope",
        activation=_activation(hf, "gelu"), qkv_bias=bias, out_bias=bias, mlp_bias=True,
        parallel_residual=hf.get("use_parallel_residual", True),
        tie_embeddings=hf.get("tie_word_embeddings", False), **_rope_fields(hf, "gpt_neox"),
    )  # fmt: skip


def _decoder_config(hf: dict, family: str) -> dict:
    """Llama, Mistral, Qwen 2/3, Gemma 2/3: RMSNorm, RoPE, GQA, gated MLP."""
    gemma = family.startswith("gemma")
    heads = hf["num_attention_heads"]
    n_layers = hf["num_hidden_layers"]
    out = dict(
        family=family, vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
        d_model=hf["hidden_size"], n_layers=n_layers, n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
        layer_norm_eps=hf.get("rms_norm_eps", 1e-6), norm="rmsnorm", positions="rope",
        mlp="gated", activation=_activation(hf, "gelu_pytorch_tanh" if gemma else "silu"),
        tie_embeddings=hf.get("tie_word_embeddings", gemma), **_rope_fields(hf, family),
    )  # fmt: skip
    bias = bool(hf.get("attention_bias", False))
    out.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if family == "qwen2":
        out.update(qkv_bias=True, out_bias=False)
    if family == "qwen3":
        out["qk_norm"] = True
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            window, layer_types = None, None
        elif layer_types is None:
            first = hf.get("max_window_layers", 28)
            layer_types = [
                "sliding_attention" if i >= first else "full_attention" for i in range(n_layers)
            ]
    if family == "mistral":
        layer_types = None  # every layer slides when sliding_window is set
    if gemma:
        out.update(
            norm_offset=True, post_norms=True, embed_scale=True, qk_norm=family == "gemma3_text",
            attn_scale=float(hf.get("query_pre_attn_scalar", out["head_dim"])) ** -0.5,
            attn_softcap=hf.get("attn_logit_softcapping", 50.0 if family == "gemma2" else None),
            final_softcap=hf.get("final_logit_softcapping", 30.0 if family == "gemma2" else None),
        )  # fmt: skip
        if layer_types is None:
            period = 2 if family == "gemma2" else hf.get("sliding_window_pattern", 6)
            layer_types = [
                "full_attention" if (i + 1) % period == 0 else "sliding_attention"
                for i in range(n_layers)
            ]
    if layer_types is not None and "sliding_attention" not in layer_types:
        window, layer_types = None, None
    layer_types = None if window is None else tuple(layer_types) if layer_types else None
    out.update(sliding_window=window, layer_types=layer_types)
    return out


def _config_from_hf(hf: dict, overrides: dict) -> TransformerConfig:
    family = hf.get("model_type", "gpt2")
    if family not in FAMILIES:
        raise ValueError(
            f"unsupported model_type {family!r}; supported: {', '.join(FAMILIES)} (a multimodal "
            "Gemma 3 checkpoint, model_type 'gemma3', needs its text model saved on its own)"
        )
    if family == "gpt2":
        fields = _gpt2_config(hf)
    elif family == "gpt_neox":
        fields = _neox_config(hf)
    else:
        fields = _decoder_config(hf, family)
    return TransformerConfig(**{**fields, **overrides})


def config_from_pretrained(path: str, **config_overrides) -> TransformerConfig:
    """The `TransformerConfig` of an HF folder (local or cloud), from its config.json alone (no
    weights read): what a driver checks before it writes or loads anything."""
    text = (paths.as_path(path) / "config.json").read_text()
    return _config_from_hf(json.loads(text), config_overrides)


# --------------------------------------------------------------------------------------------
# Load


def _load_tensors(path: str) -> dict[str, np.ndarray]:
    folder = paths.as_path(path)
    single, index = folder / _WEIGHTS, folder / _INDEX
    if single.exists():
        return paths.load_safetensors(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(paths.load_safetensors(folder / shard))
        return tensors
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "not a folder"
    raise FileNotFoundError(
        f"{path}: no {_WEIGHTS} (or sharded {_INDEX}); only safetensors checkpoints are "
        f"supported (convert pytorch_model.bin with transformers first). Found: {found}"
    )


def _abstract_params(config: TransformerConfig) -> dict[str, tuple]:
    tree = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {
        "/".join(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def from_pretrained(path: str, **config_overrides) -> tuple[TransformerConfig, dict]:
    """Read a local HF folder of any supported family -> (config, float32 params for
    `Transformer(config)`).

    `config_overrides` set fields HF does not store, e.g. `dtype="bfloat16"`, `remat=True`.
    """
    config = config_from_pretrained(path, **config_overrides)
    tensors = {k: v for k, v in _load_tensors(path).items() if not hf_map.ignored(k)}
    shapes = _abstract_params(config)
    prefix = {"gpt2": "transformer.", "gpt_neox": "gpt_neox."}.get(config.family, "model.")

    def take(name: str) -> np.ndarray:
        for candidate in (name, name.removeprefix(prefix)):
            if candidate in tensors:
                return np.asarray(tensors.pop(candidate), np.float32)
        raise KeyError(f"{path}: missing tensor {name!r} (model_type {config.family!r})")

    params: dict = {}
    for entry in hf_map.entries(config):
        try:
            values = entry.split(take(entry.hf), [shapes[o] for o in entry.ours])
        except ValueError as e:  # a reshape that does not fit: the shapes disagree
            raise ValueError(
                f"{path}: tensor {entry.hf!r} does not match the shapes its config.json gives "
                f"({[shapes[o] for o in entry.ours]}): {e}"
            ) from None
        for ours, value in zip(entry.ours, values):
            if value.shape != shapes[ours]:
                raise ValueError(
                    f"{path}: tensor {entry.hf!r} gives {ours} of shape {value.shape}, but its "
                    f"config.json gives {shapes[ours]}"
                )
            _set(params, ours, np.ascontiguousarray(value))
    if config.tie_embeddings:
        for name in ("lm_head.weight", "embed_out.weight"):
            tensors.pop(name, None)  # a tied output layer some checkpoints store anyway
    if tensors:
        raise ValueError(f"{path}: unexpected tensors {sorted(tensors)[:8]}")
    missing = sorted(set(shapes) - {o for e in hf_map.entries(config) for o in e.ours})
    if missing:  # a family whose map misses a parameter: a bug here, not in the checkpoint
        raise AssertionError(f"parameters without a tensor: {missing}")
    return config, params


# --------------------------------------------------------------------------------------------
# Save


def _rope_json(config: TransformerConfig) -> dict:
    params: dict[str, Any] = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type == "linear":
        params["factor"] = config.rope_factor
    elif config.rope_type == "llama3":
        params.update(
            factor=config.rope_factor,
            low_freq_factor=config.rope_low_freq_factor,
            high_freq_factor=config.rope_high_freq_factor,
            original_max_position_embeddings=config.rope_original_max_len,
        )
    return params


def _hf_config(config: TransformerConfig) -> dict:
    c = config
    act = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu"}[c.activation]
    if c.family == "gpt2":
        return {
            "activation_function": "gelu_new", "vocab_size": c.vocab_size,
            "n_positions": c.max_len, "n_embd": c.d_model, "n_layer": c.n_layers,
            "n_head": c.n_heads, "n_inner": c.d_ff, "layer_norm_epsilon": c.layer_norm_eps,
            "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
        }  # fmt: skip
    rope = _rope_json(c)
    scaling = (
        None if c.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    )
    common = {
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "intermediate_size": c.d_ff,
        "max_position_embeddings": c.max_len, "hidden_act": act,
        "tie_word_embeddings": c.tie_embeddings, "rope_theta": c.rope_theta,
        "rope_scaling": scaling, "attention_dropout": 0.0,
    }  # fmt: skip
    if c.family == "gpt_neox":
        rope["partial_rotary_factor"] = c.rotary_fraction
        return {
            **common, "layer_norm_eps": c.layer_norm_eps, "rotary_pct": c.rotary_fraction,
            "rotary_emb_base": c.rope_theta, "use_parallel_residual": c.parallel_residual,
            "attention_bias": c.qkv_bias, "hidden_dropout": 0.0, "rope_parameters": rope,
        }  # fmt: skip
    out = {
        **common, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.layer_norm_eps, "attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias,
        "rope_parameters": rope, "sliding_window": c.sliding_window,
    }  # fmt: skip
    layer_types = list(c.layer_types) if c.layer_types else None
    if layer_types is None:
        kind = "full_attention" if c.sliding_window is None else "sliding_attention"
        layer_types = [kind] * c.n_layers
    if c.family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=c.sliding_window is not None, layer_types=layer_types)
        out["max_window_layers"] = (
            layer_types.index("sliding_attention") if out["use_sliding_window"] else c.n_layers
        )
    if c.family.startswith("gemma"):
        scalar = c.head_dim if c.attn_scale is None else round(c.attn_scale**-2, 6)
        scalar = int(scalar) if float(scalar).is_integer() else scalar  # transformers wants an int
        out.update(
            hidden_activation=act, query_pre_attn_scalar=scalar,
            attn_logit_softcapping=c.attn_softcap, final_logit_softcapping=c.final_softcap,
            layer_types=layer_types,
        )  # fmt: skip
    if c.family == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": c.rope_local_theta or c.rope_theta}
        out.update(
            rope_parameters={"full_attention": rope, "sliding_attention": local},
            rope_local_base_freq=local["rope_theta"],
        )
    return out


def _same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def save_pretrained(
    path: str,
    config: TransformerConfig,
    params: dict,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write `params` as an HF folder of `config.family` that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads with the same logits.

    Raises:
      ValueError: the config is not expressible in its family's config.json (e.g. Mistral with
        per-layer windows), before anything is written.
    """
    hf_config = {
        "architectures": [_ARCHITECTURES[config.family]],
        "model_type": config.family,
        **_hf_config(config),
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": "float32",
    }
    if config.d_model % config.n_heads:
        raise ValueError(
            f"transformers refuses a hidden size ({config.d_model}) that is not a multiple of the "
            f"number of attention heads ({config.n_heads}), even with head_dim set; choose "
            "n_heads dividing d_model"
        )
    back = _config_from_hf(json.loads(json.dumps(hf_config)), {})
    differ = [f for f in _ARCH_FIELDS if not _same_value(getattr(back, f), getattr(config, f))]
    if differ:
        raise ValueError(
            f"this config cannot be written as a {config.family!r} checkpoint: its config.json "
            f"would read back with other {', '.join(differ)}"
        )
    p = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    tensors = {}
    for entry in hf_map.entries(config):
        tensors[entry.hf] = np.ascontiguousarray(entry.join([_get(p, o) for o in entry.ours]))
    folder = paths.as_path(path)  # weights first, config.json (what readers test) last
    paths.save_safetensors(folder / _WEIGHTS, tensors, metadata={"format": "pt"})
    text = json.dumps(hf_config, indent=2, sort_keys=True)
    paths.write_text_atomic(folder / "config.json", text)
