"""Models between stages: one hand-over mechanism from SFT to the reward model, DPO and PPO.

A language-model stage writes `WORKDIR/hf/`, a Hugging Face folder of its family
(`models.save_pretrained`, plus the tokenizer), and `WORKDIR/model_config.json` (our
`TransformerConfig`, which also keeps `dtype`/`remat`); the reward-model stage writes
`WORKDIR/reward_model/` (the trunk as an HF folder, the head as `head.safetensors`). These are
written when a stage finishes, whole (`paths.publish_dir`: locally a temporary sibling renamed
into place; on a cloud workdir such as gs:// the files readers test for, config.json and
head.safetensors, are uploaded last); checkpoints (`WORKDIR/checkpoints`) are only for resuming.
Paths may be local or cloud URLs; only the primary host writes. `load_init_params` reads either
back, or any supported HF folder (GPT-2, Llama, Mistral, Qwen 2/3, Gemma 2/3, GPT-NeoX).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from rlhf_jax import data as rdata
from rlhf_jax import distributed, models, paths
from rlhf_jax.errors import ConfigError

# The files and folders of a workdir that the stages hand over, and its run configuration.
RUN_CONFIG = "run_config.json"
MODEL_CONFIG = "model_config.json"
HF_DIR = "hf"
REWARD_DIR = "reward_model"
HEAD_FILE = "head.safetensors"
GENERATION_CONFIG = "generation_config.json"
# What readers test a hand-over folder for (`_is_hf_folder`), written last on a cloud workdir.
_COMPLETE = ("config.json", HEAD_FILE)


def _write_dir(path: epath.Path, write: Callable[[epath.Path], None]) -> None:
    """Publishes a folder whole (`paths.publish_dir`; primary only)."""
    if distributed.is_primary():
        paths.publish_dir(path, write, last=_COMPLETE)


def _write_model_config(workdir: epath.Path, config: models.TransformerConfig) -> None:
    if distributed.is_primary():
        text = json.dumps(dataclasses.asdict(config), indent=2)
        paths.write_text_atomic(workdir / MODEL_CONFIG, text)


def _hf_folder(folder: epath.Path, config, params, tokenizer) -> None:
    """An HF folder `transformers` loads whole: weights and config.json, and with a tokenizer its
    files (special tokens, chat template) and generation_config.json (bos / eos / pad ids)."""
    ids = {}
    if tokenizer is not None:
        tokenizer.save(folder)
        ids = {
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
        paths.write_text_atomic(folder / GENERATION_CONFIG, json.dumps(ids, indent=2) + "\n")
    models.save_pretrained(str(folder), config, params, **ids)


def save_lm(
    workdir: str | os.PathLike,
    config: models.TransformerConfig,
    params: Any,
    *,
    tokenizer: rdata.Tokenizer | None = None,
) -> epath.Path:
    """Writes a language model for the next stage: `WORKDIR/hf/` and `WORKDIR/model_config.json`.

    Returns:
      The HF folder (loadable by `load_init_params(workdir)` and by transformers).
    """
    workdir = paths.as_path(workdir)
    params = distributed.to_host(params)  # all processes: a collective when params span hosts
    _write_dir(workdir / HF_DIR, lambda d: _hf_folder(d, config, params, tokenizer))
    _write_model_config(workdir, config)
    return workdir / HF_DIR


def save_reward_model(
    workdir: str | os.PathLike,
    config: models.TransformerConfig,
    params: Any,
    *,
    tokenizer: rdata.Tokenizer | None = None,
) -> epath.Path:
    """Writes `WORKDIR/reward_model/`: the trunk as an HF folder plus the head as head.safetensors.

    Args:
      params: `RewardModel` params `{"transformer": ..., "head": {"kernel": [D, 1], "bias": [1]}}`.
    """
    workdir = paths.as_path(workdir)
    params = distributed.to_host(params)  # all processes: a collective when params span hosts

    def write(d: epath.Path) -> None:
        _hf_folder(d, config, params["transformer"], tokenizer)
        head = {k: np.ascontiguousarray(v, np.float32) for k, v in params["head"].items()}
        paths.save_safetensors(d / HEAD_FILE, head)

    _write_dir(workdir / REWARD_DIR, write)
    _write_model_config(workdir, config)
    return workdir / REWARD_DIR


def model_config(
    name: str, tokenizer: rdata.Tokenizer, **overrides: Any
) -> models.TransformerConfig:
    """`models.get_config(name)` with the vocabulary sized for `tokenizer` (rounded up to 128)."""
    vocab = -(-tokenizer.vocab_size // 128) * 128
    return models.get_config(name, **{"vocab_size": vocab, **overrides})


def check_model(
    config: models.TransformerConfig,
    tokenizer: rdata.Tokenizer,
    *,
    max_length: int,
    tokenizer_name: str = "the task tokenizer",
) -> None:
    """Raises a ConfigError when the model cannot read the run's rows: an embedding with fewer
    rows than the tokenizer's ids (`tokenizer_name` says which tokenizer), or a context shorter
    than `max_length` tokens."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({config.vocab_size}) is smaller than {tokenizer_name}'s "
            f"({tokenizer.vocab_size} ids): its embedding has no row for the larger ids; "
            "--init-from a model trained with this tokenizer"
        )
    if max_length > config.max_len:
        raise ConfigError(
            f"rows of {max_length} tokens exceed the model's context of {config.max_len}; "
            "lower --max-length / --max-new-tokens"
        )


def _is_hf_folder(path: epath.Path) -> bool:
    weights = (path / "model.safetensors").is_file() or (
        path / "model.safetensors.index.json"
    ).is_file()
    return (path / "config.json").is_file() and weights


def _config_overrides(workdir: epath.Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """dtype/remat of the stage (HF's config.json does not store them), then `overrides`."""
    out = {}
    if (workdir / MODEL_CONFIG).is_file():
        stored = json.loads((workdir / MODEL_CONFIG).read_text())
        out = {k: stored[k] for k in ("dtype", "remat") if k in stored}
    return {**out, **overrides}


def resolve_init_folder(
    path: str | os.PathLike, *, kind: str = "lm", flag: str = "--init-from"
) -> epath.Path:
    """The HF folder that `load_init_params(path, kind=kind)` would read, found without reading
    any weights (a driver calls it before it writes anything).

    Raises:
      ConfigError: the path is neither a supported HF folder nor a finished stage's workdir, saying
        what is there and naming `flag`.
    """
    if kind not in ("lm", "reward"):
        raise ValueError(f"kind must be 'lm' or 'reward', got {kind!r}")
    root = paths.as_path(path)
    if not root.exists():
        raise ConfigError(f"{flag} {path}: no such file or folder")
    candidates = [root]
    if kind == "lm":
        candidates += [root / HF_DIR, root / REWARD_DIR]
    else:
        candidates += [root / REWARD_DIR]
    for folder in candidates:
        if _is_hf_folder(folder) and (kind == "lm" or (folder / HEAD_FILE).is_file()):
            return folder
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "a file"
    if (root / RUN_CONFIG).is_file():
        want = HF_DIR if kind == "lm" else REWARD_DIR
        hint = (
            f"it is a workdir without {want}/: run its stage to completion first (rerun its "
            "command)" + ("" if kind == "lm" else ", or pass a reward-model workdir")
        )
    else:
        need = "config.json + model.safetensors" + (f" + {HEAD_FILE}" if kind == "reward" else "")
        hint = f"expected a Hugging Face model folder ({need}) or a workdir of an earlier stage"
    raise ConfigError(f"{flag} {path}: {hint}; found {found}")


def init_config(
    path: str | os.PathLike, *, kind: str = "lm", flag: str = "--init-from", **overrides: Any
) -> models.TransformerConfig:
    """The model config `load_init_params` would return, from config.json alone."""
    folder = resolve_init_folder(path, kind=kind, flag=flag)
    workdir = folder.parent if folder != paths.as_path(path) else folder
    return models.config_from_pretrained(str(folder), **_config_overrides(workdir, overrides))


def load_init_params(
    path: str | os.PathLike, *, kind: str = "lm", **overrides: Any
) -> tuple[models.TransformerConfig, Any]:
    """Initial params from a Hugging Face folder of any supported family or from the workdir of an
    earlier stage.

    Args:
      path: an HF folder (config.json + model.safetensors); or a workdir: kind "lm" reads
        `WORKDIR/hf/` (else the trunk of `WORKDIR/reward_model/`), kind "reward" reads
        `WORKDIR/reward_model/`.
      kind: "lm" (`Transformer` params) or "reward" (`RewardModel` params).
      overrides: TransformerConfig fields HF does not store, e.g. dtype="bfloat16".
    Returns:
      (config, params) with float32 NumPy params.
    Raises:
      ConfigError: the path is neither (or the stage has not finished), saying what is there.
    """
    folder = resolve_init_folder(path, kind=kind)
    workdir = folder.parent if folder != paths.as_path(path) else folder
    config, lm = models.from_pretrained(str(folder), **_config_overrides(workdir, overrides))
    if kind == "lm":
        return config, lm
    head = paths.load_safetensors(folder / HEAD_FILE)
    head = {k: np.asarray(v, np.float32) for k, v in head.items()}
    return config, {"transformer": lm, "head": head}


def load_reward_model(path: str | os.PathLike, **overrides: Any) -> tuple[Any, Any]:
    """(config, RewardModel params) from a reward-model workdir or its `reward_model/` folder."""
    return load_init_params(path, kind="reward", **overrides)
