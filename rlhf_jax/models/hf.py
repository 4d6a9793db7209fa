"""Hugging Face GPT-2 checkpoints in and out: a local folder with config.json + model.safetensors.

No network and no torch: `safetensors` (NumPy) and `json` only. The parameter mapping is a renaming
(`transformer.h.{i}.attn.c_attn.weight` <-> `h_{i}/attn/c_attn/kernel`, LayerNorm `weight` <->
`scale`, embedding `weight` <-> `embedding`); HF's Conv1D weights are already [in, out]. The
output layer is tied to `wte`, so `lm_head.weight` is not written (as HF itself saves GPT-2) and is
ignored on load.
"""

import json
import os

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.transformer import init_params

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _config_from_hf(hf: dict, overrides: dict) -> TransformerConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"only GPT-2 checkpoints are supported, got model_type={hf['model_type']}")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise ValueError(f"unsupported activation_function {act!r} (need one of {_TANH_GELUS})")
    for key, ok in [
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("tie_word_embeddings", True),
    ]:
        if hf.get(key, ok) != ok:
            raise ValueError(f"unsupported GPT-2 variant: {key}={hf[key]}")
    d_model = hf["n_embd"]
    return TransformerConfig(
        **{
            "vocab_size": hf["vocab_size"],
            "max_len": hf.get("n_positions", hf.get("n_ctx")),
            "d_model": d_model,
            "n_layers": hf["n_layer"],
            "n_heads": hf["n_head"],
            "d_ff": hf.get("n_inner") or 4 * d_model,
            "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            **overrides,
        }
    )


def _load_tensors(path: str) -> dict[str, np.ndarray]:
    single, index = os.path.join(path, _WEIGHTS), os.path.join(path, _INDEX)
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(os.path.join(path, shard)))
        return tensors
    found = sorted(os.listdir(path)) if os.path.isdir(path) else "not a folder"
    raise FileNotFoundError(
        f"{path}: no {_WEIGHTS} (or sharded {_INDEX}); only safetensors checkpoints are "
        f"supported (convert pytorch_model.bin with transformers first). Found: {found}"
    )


def config_from_pretrained(path: str, **config_overrides) -> TransformerConfig:
    """The `TransformerConfig` of a local HF GPT-2 folder, from its config.json alone (no
    weights read): what a driver checks before it writes or loads anything."""
    with open(os.path.join(path, "config.json")) as f:
        return _config_from_hf(json.load(f), config_overrides)


def from_pretrained(path: str, **config_overrides) -> tuple[TransformerConfig, dict]:
    """Read a local HF GPT-2 folder -> (config, float32 params for `Transformer(config)`).

    `config_overrides` set fields HF does not store, e.g. `dtype="bfloat16"`, `remat=True`.
    """
    config = config_from_pretrained(path, **config_overrides)
    tensors = {}
    for name, value in _load_tensors(path).items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied output layer; causal-mask buffers of old checkpoints
        tensors[name] = np.asarray(value, np.float32)

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"{path}: missing tensor {name!r}")
        return tensors.pop(name)

    def linear(prefix: str) -> dict:
        return {"kernel": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}

    def norm(prefix: str) -> dict:
        return {"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}

    params = {"wte": {"embedding": take("wte.weight")}, "wpe": {"embedding": take("wpe.weight")}}
    for i in range(config.n_layers):
        params[f"h_{i}"] = {
            "ln_1": norm(f"h.{i}.ln_1"),
            "attn": {
                "c_attn": linear(f"h.{i}.attn.c_attn"),
                "c_proj": linear(f"h.{i}.attn.c_proj"),
            },
            "ln_2": norm(f"h.{i}.ln_2"),
            "mlp": {"c_fc": linear(f"h.{i}.mlp.c_fc"), "c_proj": linear(f"h.{i}.mlp.c_proj")},
        }
    params["ln_f"] = norm("ln_f")
    if tensors:
        raise ValueError(f"{path}: unexpected tensors {sorted(tensors)[:8]}")
    _check_shapes(config, params)
    return config, params


def _check_shapes(config: TransformerConfig, params: dict) -> None:
    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise ValueError("checkpoint tensors do not match the GPT-2 layout of its config.json")
    bad = [
        (jax.tree_util.keystr(k), a.shape, e.shape)
        for (k, a), e in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(expected)
        )
        if a.shape != e.shape
    ]
    if bad:
        raise ValueError(f"checkpoint shapes do not match its config.json: {bad[:4]}")


def save_pretrained(
    path: str,
    config: TransformerConfig,
    params: dict,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write `params` as an HF GPT-2 folder that `GPT2LMHeadModel.from_pretrained(path)` loads."""
    os.makedirs(path, exist_ok=True)
    p = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    tensors = {"transformer.wte.weight": p["wte"]["embedding"]}
    tensors["transformer.wpe.weight"] = p["wpe"]["embedding"]
    for i in range(config.n_layers):
        block = p[f"h_{i}"]
        for hf_name, (a, b) in {
            "ln_1": (block["ln_1"]["scale"], block["ln_1"]["bias"]),
            "attn.c_attn": (block["attn"]["c_attn"]["kernel"], block["attn"]["c_attn"]["bias"]),
            "attn.c_proj": (block["attn"]["c_proj"]["kernel"], block["attn"]["c_proj"]["bias"]),
            "ln_2": (block["ln_2"]["scale"], block["ln_2"]["bias"]),
            "mlp.c_fc": (block["mlp"]["c_fc"]["kernel"], block["mlp"]["c_fc"]["bias"]),
            "mlp.c_proj": (block["mlp"]["c_proj"]["kernel"], block["mlp"]["c_proj"]["bias"]),
        }.items():
            tensors[f"transformer.h.{i}.{hf_name}.weight"] = a
            tensors[f"transformer.h.{i}.{hf_name}.bias"] = b
    tensors["transformer.ln_f.weight"] = p["ln_f"]["scale"]
    tensors["transformer.ln_f.bias"] = p["ln_f"]["bias"]
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(path, _WEIGHTS), metadata={"format": "pt"})
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_len,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": 0.02,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": "float32",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
