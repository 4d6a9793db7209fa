"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, as
`peft.PeftModel.from_pretrained(transformers_model, path)` reads and `save_pretrained` writes.

    save_peft(path, config, adapters, lora_cfg)      # our adapters -> a PEFT folder
    adapters, lora_cfg = load_peft(path, config)     # a PEFT folder (ours or PEFT's) -> ours

The folder may be local or a cloud URL such as gs:// (`rlhf_jax.paths`).

PEFT stores, per adapted `torch.nn.Linear` (or GPT-2 `Conv1D`) named M,
`base_model.model.M.lora_A.weight` [r, in_features] and `...lora_B.weight` [out_features, r],
scaled by `lora_alpha / r` (`alpha / sqrt(r)` with `use_rslora`). Module names and the layout of
each HF weight come from the same tensor maps as `save_pretrained` (`models.hf_map`). A fused HF
projection (GPT-2's `c_attn`, GPT-NeoX's `query_key_value`) carries our three q/k/v adapters as
one adapter of rank 3r (A stacked, B block-diagonal: exactly the same update); loading such an
adapter gives each of q, k, v the whole A (rank R) and its rows of B.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import jax
import numpy as np

from rlhf_jax import paths
from rlhf_jax.lora.adapters import LoraConfig
from rlhf_jax.models import hf_map
from rlhf_jax.models.config import TransformerConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _kernel_entries(config: TransformerConfig) -> list[tuple[Any, list[str]]]:
    """(entry, our module paths) of every HF weight that maps onto projection kernels."""
    out = []
    for entry in hf_map.entries(config):
        if entry.hf.endswith(".weight") and all(o.endswith("/kernel") for o in entry.ours):
            modules = [o[: -len("/kernel")] for o in entry.ours]
            if all(re.search(r"(attn/(q|k|v|o)|mlp/(gate|up|down))$", m) for m in modules):
                out.append((entry, modules))
    return out


def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _has(tree, path: str) -> bool:
    for key in path.split("/"):
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def save_peft(
    path: str,
    config: TransformerConfig,
    adapters: dict,
    lora_cfg: Any,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes `adapters` (`lora.init_adapters` layout, unscaled) as a PEFT LoRA folder for the HF
    model of `config.family` (`models.save_pretrained`).

    Raises:
      ValueError: an adapter on only some of a fused projection's q/k/v (not expressible in
        PEFT, whose adapter covers the whole fused module), before anything is written.
    """
    ad = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), adapters)
    conv1d = config.family == "gpt2"  # HF weights [in, out] (the join's layout): transpose B
    tensors, targets, rank_pattern, alpha_pattern = {}, set(), {}, {}
    for entry, modules in _kernel_entries(config):
        present = [_has(ad, m) for m in modules]
        if not any(present):
            continue
        hf_module = entry.hf[: -len(".weight")]
        if not all(present):
            raise ValueError(
                f"PEFT cannot express adapters on only some of {', '.join(modules)}: they share "
                f"one HF module {hf_module!r}; target all of them (or none)"
            )
        parts = [_get(ad, m) for m in modules]
        r = parts[0]["a"].shape[-1]
        total = r * len(parts)
        a = np.concatenate([p["a"].reshape(-1, r).T for p in parts], axis=0)  # [total, in]
        if len(parts) == 1:
            b = parts[0]["b"].reshape(r, -1).T  # [out, r]
        else:  # fused q/k/v: block rows of [total, *out] pseudo-kernels, fused by the HF map
            blocks = []
            for j, p in enumerate(parts):
                block = np.zeros((total, *p["b"].shape[1:]), np.float32)
                block[j * r : (j + 1) * r] = p["b"]
                blocks.append(block)
            b = entry.join(blocks)  # the HF layout of a weight whose input is the rank
            b = b.T if conv1d else b  # [out, total]
        tensors[f"{_PREFIX}{hf_module}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{_PREFIX}{hf_module}.lora_B.weight"] = np.ascontiguousarray(b)
        name = hf_module.rsplit(".", 1)[-1]
        targets.add(name)
        if total != lora_cfg.rank:
            rank_pattern[name] = total
            alpha_pattern[name] = lora_cfg.alpha * total / lora_cfg.rank  # same scale alpha / r
    if not tensors:
        raise ValueError("no adapters to save")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    folder = paths.as_path(path)  # local or cloud; the config (what PEFT looks for) last
    paths.save_safetensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    paths.write_text_atomic(
        folder / CONFIG_FILE, json.dumps(adapter_config, indent=2, sort_keys=True)
    )


def _scale(peft_cfg: dict, name: str, rank: int) -> float:
    alpha = peft_cfg.get("alpha_pattern", {}).get(name, peft_cfg["lora_alpha"])
    return alpha / (math.sqrt(rank) if peft_cfg.get("use_rslora") else rank)


def load_peft(path: str, config: TransformerConfig) -> tuple[dict, Any]:
    """Reads a PEFT LoRA folder for the HF model of `config.family` into our adapters and a
    `lora.LoraConfig` (rank, alpha and dropout of `adapter_config.json`; a module whose own scale
    differs, by `rank_pattern` / `alpha_pattern` / rsLoRA, has it folded into its B; targets: a
    pattern that selects exactly the projections the folder adapts).

    Raises:
      ValueError: not a LoRA adapter, DoRA, a bias or `modules_to_save` we cannot represent, or
        a tensor of an unknown module (named).
    """
    folder = paths.as_path(path)
    peft_cfg = json.loads((folder / CONFIG_FILE).read_text())
    if peft_cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {peft_cfg.get('peft_type')!r}; only LORA is read")
    for key, ok in (("use_dora", False), ("bias", "none"), ("modules_to_save", None)):
        if peft_cfg.get(key, ok) not in (ok, [], False):
            raise ValueError(f"{path}: {key}={peft_cfg[key]!r} is not supported (expected {ok!r})")
    tensors = paths.load_safetensors(folder / WEIGHTS_FILE)
    rank, alpha = int(peft_cfg["r"]), float(peft_cfg["lora_alpha"])
    lora_cfg = LoraConfig(rank=rank, alpha=alpha, dropout=float(peft_cfg.get("lora_dropout", 0.0)))
    conv1d = config.family == "gpt2"
    adapters: dict = {}
    used = set()
    for entry, modules in _kernel_entries(config):
        hf_module = entry.hf[: -len(".weight")]
        a_key, b_key = (f"{_PREFIX}{hf_module}.lora_{x}.weight" for x in "AB")
        if a_key not in tensors:
            continue
        used.update((a_key, b_key))
        a, b = tensors[a_key], tensors[b_key]  # [R, in], [out, R]
        r_total = a.shape[0]
        name = hf_module.rsplit(".", 1)[-1]
        fold = _scale(peft_cfg, name, r_total) / lora_cfg.scale
        shapes = [(r_total, *_out_shape(config, m)) for m in modules]  # [R, *out] each
        if len(modules) == 1:
            b_parts = [b.T.reshape(shapes[0])]
        else:  # fused q/k/v: split by the HF map, as a weight whose input is the rank
            b_parts = entry.split(b.T if conv1d else b, shapes)
        for m, b_part in zip(modules, b_parts):
            in_shape = _in_shape(config, m)
            _set(adapters, m, {
                "a": a.T.reshape(*in_shape, r_total).astype(np.float32),
                "b": (b_part * fold).astype(np.float32),
            })  # fmt: skip
    unknown = sorted(k for k in tensors if k not in used)
    if unknown:
        raise ValueError(
            f"{path}: tensors of modules this {config.family!r} model does not adapt: "
            f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}"
        )
    if not adapters:
        raise ValueError(f"{path}: no LoRA tensors for a {config.family!r} model")
    adapted = sorted(
        m for _, modules in _kernel_entries(config) for m in modules if _has(adapters, m)
    )
    targets = "(^|/)(" + "|".join(map(re.escape, adapted)) + ")$"  # also under a model's trunk
    return adapters, dataclasses.replace(lora_cfg, targets=targets)


def _in_shape(config: TransformerConfig, module: str) -> tuple[int, ...]:
    name = module.rsplit("/", 1)[-1]
    if name == "o":
        return (config.n_heads, config.head_dim)
    if name == "down":
        return (config.d_ff,)
    return (config.d_model,)


def _out_shape(config: TransformerConfig, module: str) -> tuple[int, ...]:
    name = module.rsplit("/", 1)[-1]
    if name == "q":
        return (config.n_heads, config.head_dim)
    if name in ("k", "v"):
        return (config.n_kv_heads, config.head_dim)
    if name in ("gate", "up"):
        return (config.d_ff,)
    return (config.d_model,)
