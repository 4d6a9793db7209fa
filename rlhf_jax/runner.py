"""The shared driver library: configuration, model hand-over between stages, task data, `fit`.

Every driver in `experiments/` (sft, reward_model, dpo, ppo, frontier) is composed of these pieces:

    config = parse_config(Config, PRESETS, argv)                 # --preset NAME + tyro flags
    mesh = resolve_mesh(config.mesh)                            # "impossible mesh for N devices"
    local_batch = check_batch(config.batch_size, mesh)          # "not divisible by data x fsdp"
    write_run_config(config.workdir, config)                    # resume only with the same run
    cfg, params = load_init_params(config.init_from)            # HF folder or earlier workdir
    loader = task_loaders(task, "demonstration", batch_size=local_batch, ...)
    state, rows = fit(step, state, loader, workdir=..., steps=..., mesh=mesh)
    save_lm(config.workdir, cfg, state.params, tokenizer=tok)   # WORKDIR/hf for the next stage

Hand-over between stages (one mechanism): a language-model stage writes `WORKDIR/hf/`, a Hugging
Face GPT-2 folder (`models.save_pretrained`, plus the tokenizer), and `WORKDIR/model_config.json`
(our `TransformerConfig`, which also keeps `dtype`/`remat`); the reward-model stage writes
`WORKDIR/reward_model/` (the trunk as an HF folder, the head as `head.safetensors`). These are
written when a stage finishes; checkpoints (`WORKDIR/checkpoints`) are only for resuming.

Errors a user can fix from the command line are `ConfigError`s; `run_cli` prints them without a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import data as rdata
from rlhf_jax import models
from rlhf_jax import sharding as sh
from rlhf_jax.metrics_writer import MetricsWriter, read_metrics

logger = logging.getLogger("rlhf_jax.runner")

RUN_CONFIG = "run_config.json"
MODEL_CONFIG = "model_config.json"
HF_DIR = "hf"
REWARD_DIR = "reward_model"
HEAD_FILE = "head.safetensors"
# Config fields that may change when a run is resumed (everything else must match).
RESUMABLE_FIELDS = (
    "steps",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "keep",
    "workdir",
    "data_dir",
)
HEALTH_METRICS = ("loss", "grad_norm", "update_norm")  # checked for NaN/Inf at every step


class ConfigError(ValueError):
    """A bad configuration, with a message that says what to change."""


# ----------------------------------------------------------------------------------------------
# Command line and run configuration.


def parse_config(
    config_cls: type,
    presets: Mapping[str, Any],
    argv: Sequence[str] | None = None,
    *,
    default_preset: str = "default",
    description: str | None = None,
) -> Any:
    """`--preset NAME` picks the defaults from `presets`; every other flag overrides a field (tyro).

    Args:
      config_cls: the driver's frozen config dataclass.
      presets: name -> config instance.
      argv: the arguments (default `sys.argv[1:]`).
      default_preset: the preset used when `--preset` is absent.
      description: the `--help` text (the driver's docstring).
    Returns:
      The config.
    Raises:
      ConfigError: an unknown preset, naming the known ones.
    """
    import tyro

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=default_preset)
    known, rest = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if known.preset not in presets:
        raise ConfigError(
            f"unknown preset {known.preset!r}; choose one of: {', '.join(presets)} (--preset NAME)"
        )
    text = (description or "") + f"\n\nPresets (--preset NAME): {', '.join(presets)}."
    return tyro.cli(config_cls, default=presets[known.preset], args=rest, description=text)


def run_cli(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Runs `main(sys.argv[1:])`; a `ConfigError` prints "error: ..." and exits with status 2."""
    try:
        main(None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def write_run_config(
    workdir: str | os.PathLike,
    config: Any,
    *,
    resumable: Sequence[str] = RESUMABLE_FIELDS,
) -> dict[str, Any]:
    """Writes `WORKDIR/run_config.json`; refuses to resume a run that was configured differently.

    Args:
      workdir: the run directory.
      config: a dataclass instance (or a dict).
      resumable: fields that may differ from the stored config (steps-like ones).
    Returns:
      The config as written (JSON values).
    Raises:
      ConfigError: the workdir holds a run whose config differs in other fields (named).
    """
    new = _json_ready(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config)
    path = Path(workdir) / RUN_CONFIG
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        fixed = [k for k in diff if k not in resumable]
        if fixed:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fixed)
            raise ConfigError(
                f"{workdir} holds a run with a different configuration ({changes}); use another "
                f"--workdir, or the stored settings (only {', '.join(resumable)} may change when "
                "a run is resumed)"
            )
    if sh.is_primary():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return new


def resolve_mesh(spec: str) -> jax.sharding.Mesh:
    """The ("data", "fsdp", "tensor") mesh of a `--mesh` spec such as "data=2,fsdp=4,tensor=1".

    Axes left out default to data=-1 (all remaining devices), fsdp=1, tensor=1; the mesh always
    spans all devices.
    Raises:
      ConfigError: "impossible mesh for N devices: ..." with what would work.
    """
    n = jax.device_count()
    try:
        return sh.make_mesh(**sh.parse_mesh_spec(spec))
    except ValueError as e:
        raise ConfigError(f"impossible mesh for {n} devices: {e} (--mesh)") from None


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, *, name: str = "batch_size") -> int:
    """Checks that the global `batch_size` splits over the mesh's batch axes and the hosts.

    Returns:
      The number of rows each host loads (`batch_size // jax.process_count()`).
    Raises:
      ConfigError: saying which multiple to choose.
    """
    try:
        sh.check_batch_divisible(batch_size, mesh)
    except ValueError as e:
        raise ConfigError(f"--{name.replace('_', '-')}: {e}") from None
    if batch_size % jax.process_count():
        raise ConfigError(
            f"--{name.replace('_', '-')} {batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )
    return batch_size // jax.process_count()


def default_data_dir(anchor: str | os.PathLike) -> str:
    """`$RLHF_JAX_DATA`, else `data/` in the repository holding `anchor` (a driver's __file__)."""
    return os.environ.get("RLHF_JAX_DATA") or str(Path(anchor).resolve().parents[1] / "data")


# ----------------------------------------------------------------------------------------------
# Models between stages.


def _write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Writes a folder into a temporary sibling and renames it into place (primary only)."""
    if not sh.is_primary():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_model_config(workdir: Path, config: models.TransformerConfig) -> None:
    if sh.is_primary():
        (workdir / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=2))


def _hf_folder(folder: Path, config, params, tokenizer) -> None:
    ids = {}
    if tokenizer is not None:
        tokenizer.save(folder)
        ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    models.save_pretrained(str(folder), config, params, **ids)


def save_lm(
    workdir: str | os.PathLike,
    config: models.TransformerConfig,
    params: Any,
    *,
    tokenizer: rdata.Tokenizer | None = None,
) -> Path:
    """Writes a language model for the next stage: `WORKDIR/hf/` and `WORKDIR/model_config.json`.

    Returns:
      The HF folder (loadable by `load_init_params(workdir)` and by transformers).
    """
    workdir = Path(workdir)
    params = jax.device_get(params)
    _write_dir(workdir / HF_DIR, lambda d: _hf_folder(d, config, params, tokenizer))
    _write_model_config(workdir, config)
    return workdir / HF_DIR


def save_reward_model(
    workdir: str | os.PathLike,
    config: models.TransformerConfig,
    params: Any,
    *,
    tokenizer: rdata.Tokenizer | None = None,
) -> Path:
    """Writes `WORKDIR/reward_model/`: the trunk as an HF folder plus the head as head.safetensors.

    Args:
      params: `RewardModel` params `{"transformer": ..., "head": {"kernel": [D, 1], "bias": [1]}}`.
    """
    from safetensors.numpy import save_file

    workdir = Path(workdir)
    params = jax.device_get(params)

    def write(d: Path) -> None:
        _hf_folder(d, config, params["transformer"], tokenizer)
        head = {k: np.ascontiguousarray(v, np.float32) for k, v in params["head"].items()}
        save_file(head, str(d / HEAD_FILE))

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
    config: models.TransformerConfig, tokenizer: rdata.Tokenizer, *, max_length: int
) -> None:
    """Raises a ConfigError when the model cannot read the task's rows: an embedding with fewer
    rows than the tokenizer's ids, or a context shorter than `max_length` tokens."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({config.vocab_size}) is smaller than the task tokenizer's "
            f"({tokenizer.vocab_size}); --init-from a model trained with this task's tokenizer"
        )
    if max_length > config.max_len:
        raise ConfigError(
            f"rows of {max_length} tokens exceed the model's context of {config.max_len}; "
            "lower --max-length / --max-new-tokens"
        )


def _is_hf_folder(path: Path) -> bool:
    weights = (path / "model.safetensors").is_file() or (
        path / "model.safetensors.index.json"
    ).is_file()
    return (path / "config.json").is_file() and weights


def _config_overrides(workdir: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """dtype/remat of the stage (HF's config.json does not store them), then `overrides`."""
    out = {}
    if (workdir / MODEL_CONFIG).is_file():
        stored = json.loads((workdir / MODEL_CONFIG).read_text())
        out = {k: stored[k] for k in ("dtype", "remat") if k in stored}
    return {**out, **overrides}


def load_init_params(
    path: str | os.PathLike, *, kind: str = "lm", **overrides: Any
) -> tuple[models.TransformerConfig, Any]:
    """Initial params from a Hugging Face GPT-2 folder or from the workdir of an earlier stage.

    Args:
      path: an HF GPT-2 folder (config.json + model.safetensors); or a workdir: kind "lm" reads
        `WORKDIR/hf/` (else the trunk of `WORKDIR/reward_model/`), kind "reward" reads
        `WORKDIR/reward_model/`.
      kind: "lm" (`Transformer` params) or "reward" (`RewardModel` params).
      overrides: TransformerConfig fields HF does not store, e.g. dtype="bfloat16".
    Returns:
      (config, params) with float32 NumPy params.
    Raises:
      ConfigError: the path is neither (or the stage has not finished), saying what is there.
    """
    if kind not in ("lm", "reward"):
        raise ValueError(f"kind must be 'lm' or 'reward', got {kind!r}")
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"--init-from {path}: no such file or folder")
    candidates = [root]
    if kind == "lm":
        candidates += [root / HF_DIR, root / REWARD_DIR]
    else:
        candidates += [root / REWARD_DIR]
    for folder in candidates:
        if not _is_hf_folder(folder):
            continue
        if kind == "reward" and not (folder / HEAD_FILE).is_file():
            continue
        workdir = folder.parent if folder != root else root
        config, lm = models.from_pretrained(str(folder), **_config_overrides(workdir, overrides))
        if kind == "lm":
            return config, lm
        from safetensors.numpy import load_file

        head = {k: np.asarray(v, np.float32) for k, v in load_file(folder / HEAD_FILE).items()}
        return config, {"transformer": lm, "head": head}
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "a file"
    if (root / RUN_CONFIG).is_file():
        want = HF_DIR if kind == "lm" else REWARD_DIR
        hint = (
            f"it is a workdir without {want}/: run its stage to completion first (rerun its "
            "command)" + ("" if kind == "lm" else ", or pass a reward-model workdir")
        )
    else:
        need = "config.json + model.safetensors" + (f" + {HEAD_FILE}" if kind == "reward" else "")
        hint = f"expected a Hugging Face GPT-2 folder ({need}) or a workdir of an earlier stage"
    raise ConfigError(f"--init-from {path}: {hint}; found {found}")


def load_reward_model(path: str | os.PathLike, **overrides: Any) -> tuple[Any, Any]:
    """(config, RewardModel params) from a reward-model workdir or its `reward_model/` folder."""
    return load_init_params(path, kind="reward", **overrides)


# ----------------------------------------------------------------------------------------------
# Task data.

KINDS = ("demonstration", "preference", "prompt")


@functools.cache
def _tokenizer(path: str) -> rdata.Tokenizer:
    return rdata.load_tokenizer(path)


def task_tokenizer(task: Any) -> rdata.Tokenizer:
    """The task's tokenizer (`task.tokenizer_path`), loaded once per process."""
    return _tokenizer(str(task.tokenizer_path))


def task_loaders(
    task: Any,
    kind: str,
    *,
    batch_size: int,
    max_length: int,
    max_prompt_length: int,
    seed: int,
    split: str = "train",
    records: Sequence[Any] | None = None,
    tokenizer: rdata.Tokenizer | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
) -> Any:
    """A resumable grain loader of fixed-shape batches over the synthetic task (or `records`).

    Kinds and their batches (contracts.md "tokenized batch formats"):
      "demonstration": the split's full reviews as LM rows (prompt "", response = text): the
        loss covers every token after the first, [B, max_length].
      "preference": `records` (PreferenceRecords or mappings; required, the task has reviews,
        not pairs: see `make_preference_pairs`), [B, max_length] per side.
      "prompt": the split's prompts (or `records`), LEFT-padded to [B, max_prompt_length].
    Every batch is padded to the maximum length (no buckets), so a compiled step sees one shape.

    Args:
      task: a `data.synthetic.SyntheticTask` (None when `records` and `tokenizer` are given).
      kind: "demonstration", "preference" or "prompt".
      batch_size: rows per batch on this host (`check_batch`'s result).
      max_length, max_prompt_length: truncation (contracts' rules).
      seed: shuffle seed (reshuffled every epoch).
      split: "train" or "test".
      records: the elements instead of the task's split.
      tokenizer: default the task's.
      shuffle, num_epochs: as `data.make_loader` (None repeats forever).
    Returns:
      A grain iterator; `data.loader_state`/`restore_loader` save and restore its position.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    tok = tokenizer or task_tokenizer(task)
    if records is None:
        if kind == "preference":
            raise ValueError(
                "the synthetic task holds reviews, not pairs: build them with "
                "make_preference_pairs and pass records="
            )
        if kind == "demonstration":
            records = [{"prompt": "", "response": r["text"]} for r in getattr(task, split)]
        else:
            records = task.train_prompts if split == "train" else task.test_prompts
    lengths = {"max_prompt_length": max_prompt_length}
    if kind == "prompt":
        collate = rdata.collate_prompts
    else:
        collate = (
            rdata.collate_demonstrations if kind == "demonstration" else rdata.collate_preferences
        )
        lengths["max_length"] = max_length
    batch_fn = functools.partial(collate, tokenizer=tok, buckets=None, **lengths)
    return rdata.make_loader(
        list(records),
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        batch_fn=batch_fn,
    )


@functools.cache
def _sampler(model: Any, max_new_tokens: int, eos_id: int, pad_id: int) -> Callable:
    """A jitted `(params, prompt_tokens, prompt_mask, rng, temperature) -> (tokens, mask)`."""
    from rlhf_jax.sampling import generate

    def sample(params, tokens, mask, rng, temperature):
        gen = generate(
            model,
            params,
            tokens,
            mask,
            rng,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        return gen.tokens, gen.mask

    return jax.jit(sample)


def make_preference_pairs(
    policy_model: Any,
    params: Any,
    prompts: Sequence[str],
    tokenizer: rdata.Tokenizer,
    rng: jax.Array,
    *,
    completions_per_prompt: int = 4,
    max_new_tokens: int,
    temperature: float = 1.0,
    reward_fn: Callable[[list[str]], Any],
    max_prompt_length: int = 64,
    batch_size: int = 64,
    cache_path: str | os.PathLike | None = None,
) -> list[rdata.PreferenceRecord]:
    """Preference pairs labelled by a reward, as the DPO paper builds its IMDb pairs.

    k = `completions_per_prompt` completions are sampled per prompt from the policy (one compiled
    `sampling.generate` over fixed-size batches), each prompt + completion is scored with
    `reward_fn(texts)`, and all k(k-1)/2 pairs of a prompt are labelled: chosen = the higher
    reward. Exact ties (identical completions included) and pairs with an empty completion are
    dropped, and their number is logged. With `cache_path`, an existing file is read instead, and
    a fresh result is written there (JSONL, rewards in each record's metadata; on several hosts
    each samples all pairs, the same ones, and the primary writes the file).

    Args:
      policy_model: a `Transformer`; params: its params.
      prompts: N prompt strings.
      tokenizer: the task's tokenizer (EOS ends a completion).
      rng: sampling key (batch i uses fold_in(rng, i)).
      completions_per_prompt: k >= 2.
      max_new_tokens: completion length cap.
      temperature: sampling temperature.
      reward_fn: texts [M] -> rewards [M] (e.g. `synthetic.ground_truth_reward`).
      max_prompt_length: prompts keep their last this many tokens (and are left-padded to the
        longest).
      batch_size: generation batch (rows = prompts x k).
      cache_path: JSONL cache (e.g. WORKDIR/pairs.jsonl).
    Returns:
      The PreferenceRecords, grouped by prompt in prompt order.
    """
    if cache_path is not None and Path(cache_path).is_file():
        return rdata.read_preference_jsonl(cache_path)
    k = completions_per_prompt
    if k < 2:
        raise ValueError(f"completions_per_prompt must be >= 2, got {k}")
    longest = max(len(ids) for ids in tokenizer.encode_batch(prompts))
    p_len = max(1, min(max_prompt_length, longest))  # left-padded to the longest prompt
    batch = rdata.tokenize_prompts(tokenizer, prompts, max_prompt_length=p_len)
    tokens = np.repeat(batch["prompt_tokens"], k, axis=0)  # [N*k, P]
    mask = np.repeat(batch["prompt_mask"], k, axis=0)  # [N*k, P]
    rows = len(tokens)
    bs = min(batch_size, rows)
    pad = -rows % bs
    tokens = np.concatenate([tokens, tokens[:pad]])  # whole batches: one compiled shape
    mask = np.concatenate([mask, mask[:pad]])

    sample = _sampler(policy_model, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)
    outs = [
        sample(
            params, tokens[i : i + bs], mask[i : i + bs], jax.random.fold_in(rng, j), temperature
        )
        for j, i in enumerate(range(0, len(tokens), bs))
    ]
    outs = jax.device_get(outs)  # one transfer: the loop above dispatched asynchronously
    gen_tok = np.concatenate([t for t, _ in outs])[:rows]
    gen_mask = np.concatenate([m for _, m in outs])[:rows]
    ids = [t[(m > 0) & (t != tokenizer.eos_id)].tolist() for t, m in zip(gen_tok, gen_mask)]
    completions = tokenizer.decode_batch(ids)
    texts = [prompts[i // k] + c for i, c in enumerate(completions)]
    rewards = np.asarray(reward_fn(texts), np.float32)  # [N*k]
    pairs, ties, empty = [], 0, 0
    for p, prompt in enumerate(prompts):
        for a, b in itertools.combinations(range(p * k, (p + 1) * k), 2):
            if not completions[a].strip() or not completions[b].strip():
                empty += 1
            elif rewards[a] == rewards[b]:
                ties += 1
            else:
                w, lo = (a, b) if rewards[a] > rewards[b] else (b, a)
                meta = {"chosen_reward": float(rewards[w]), "rejected_reward": float(rewards[lo])}
                pairs.append(rdata.PreferenceRecord(prompt, completions[w], completions[lo], meta))
    logger.info(
        "%d preference pairs from %d prompts x %d completions; dropped %d exact ties and %d "
        "pairs with an empty completion",
        len(pairs),
        len(prompts),
        k,
        ties,
        empty,
    )
    if cache_path is not None and sh.is_primary():
        cache_path = Path(cache_path)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        rdata.write_jsonl(tmp, pairs)
        os.replace(tmp, cache_path)
    return pairs


def task_preference_pairs(
    task: Any,
    policy_config: models.TransformerConfig,
    params: Any,
    workdir: str | os.PathLike,
    *,
    split: str = "train",
    num_prompts: int,
    seed: int,
    completions_per_prompt: int = 4,
    max_new_tokens: int,
    temperature: float = 1.0,
    max_prompt_length: int = 8,
    batch_size: int = 64,
) -> list[rdata.PreferenceRecord]:
    """`make_preference_pairs` on the first `num_prompts` prompts of the task's split, scored by
    the ground truth, cached as `WORKDIR/pairs.jsonl` (train) or `WORKDIR/pairs_test.jsonl`.

    The sampling key is `fold_in(PRNGKey(seed), split index)`: stages run with the same seed and
    SFT model (reward_model.py, dpo.py) train on the same pairs.
    """
    prompts = (task.train_prompts if split == "train" else task.test_prompts)[:num_prompts]
    name = "pairs.jsonl" if split == "train" else f"pairs_{split}.jsonl"
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0 if split == "train" else 1)
    return make_preference_pairs(
        models.Transformer(policy_config),
        params,
        prompts,
        task_tokenizer(task),
        rng,
        completions_per_prompt=completions_per_prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        reward_fn=task.reward_fn,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
        cache_path=Path(workdir) / name,
    )


def _fixed_batches(
    records: Sequence[Any], collate: Callable[[Sequence[Any]], dict], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(batch, number of real rows): every batch has `batch_size` rows (the last one is filled
    with copies of the first records), so a compiled function sees one shape."""
    for i in range(0, len(records), batch_size):
        chunk = list(records[i : i + batch_size])
        n = len(chunk)
        chunk += list(records[: batch_size - n])
        yield collate(chunk), n


@functools.cache
def _reward_scores(reward_model: Any) -> Callable:
    return jax.jit(lambda p, tokens, mask: reward_model.apply({"params": p}, tokens, mask))


def preference_accuracy(
    reward_model: Any,
    params: Any,
    records: Sequence[Any],
    tokenizer: rdata.Tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Held-out pair accuracy of a reward model: the fraction of pairs with r(chosen) > r(rejected)
    (ties count as wrong), and the mean margin r(chosen) - r(rejected)."""
    if not records:
        raise ValueError("preference_accuracy needs at least one pair")
    collate = functools.partial(
        rdata.collate_preferences,
        tokenizer=tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        buckets=None,
    )
    score = _reward_scores(reward_model)
    outs = []
    for batch, n in _fixed_batches(records, collate, min(batch_size, len(records))):
        rc = score(params, batch["chosen_tokens"], batch["chosen_attention_mask"])
        rr = score(params, batch["rejected_tokens"], batch["rejected_attention_mask"])
        outs.append((rc, rr, n))
    margins = np.concatenate([np.asarray(c - r)[:n] for c, r, n in jax.device_get(outs)])
    return {"accuracy": float(np.mean(margins > 0)), "margin": float(np.mean(margins))}


def attach_reference(
    model: Any,
    params: Any,
    records: Sequence[Any],
    tokenizer: rdata.Tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 64,
    cache_path: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Runs the reference once over preference records and stores its log-probs WITH them.

    Returns records as dicts carrying `reference_chosen_logps` / `reference_rejected_logps`, so
    that `task_loaders(..., "preference", records=...)` batches them and the DPO step runs no
    reference model (`train.compute_reference_logps`). With `cache_path` (an .npz) the log-probs
    are read from there when present, else computed and written.
    """
    from rlhf_jax import train

    if cache_path is not None and Path(cache_path).is_file():
        chosen, rejected = train.load_reference_logps(str(cache_path))
    else:
        collate = functools.partial(
            rdata.collate_preferences,
            tokenizer=tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            buckets=None,
        )
        bs = min(batch_size, len(records))
        batches = (
            {**batch, "index": np.arange(i * bs, i * bs + bs) % len(records)}
            for i, (batch, _) in enumerate(_fixed_batches(records, collate, bs))
        )
        chosen, rejected = train.compute_reference_logps(model, params, batches)
        if cache_path is not None and sh.is_primary():
            train.save_reference_logps(str(cache_path), chosen, rejected)
    dicts = [r if isinstance(r, Mapping) else rdata.record_to_dict(r) for r in records]
    return train.attach_reference_to_records(dicts, chosen, rejected)


# ----------------------------------------------------------------------------------------------
# The training loop.


def _state_step(state: Any) -> int:
    step = state.get("step") if isinstance(state, Mapping) else getattr(state, "step", None)
    return 0 if step is None else int(jax.device_get(step))


def _first_bad(pending: list[tuple[int, dict[str, Any]]]) -> tuple[int, str, float] | None:
    """(step, metric, value) of the first non-finite health metric among pending steps."""
    values = jax.device_get([m for _, m in pending])
    for (t, _), m in zip(pending, values):
        for name, v in m.items():
            if not math.isfinite(float(v)):
                return t, name, float(v)
    return None


def fit(
    step_fn: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]],
    state: Any,
    batches: Iterable[Any],
    *,
    workdir: str | os.PathLike,
    steps: int,
    log_every: int = 10,
    checkpoint_every: int = 100,
    keep: int = 3,
    mesh: jax.sharding.Mesh | None = None,
    loader: Any = None,
    eval_fn: Callable[[Any, int], Mapping[str, Any]] | None = None,
    eval_every: int | None = None,
    desc: str = "train",
    progress: bool = True,
    jit: bool = True,
) -> tuple[Any, list[dict[str, Any]]]:
    """Trains `state` with `step_fn` up to `steps` updates; resumable, deterministic, NaN-safe.

    - Resume: when `WORKDIR/checkpoints` holds a checkpoint, the state and the data position are
      restored from the latest one (metrics rows after it are dropped), so a run killed at any
      point (SIGKILL included) and rerun with the same command ends bit-identical to an
      uninterrupted one. A complete run returns at once.
    - Compilation: `sharding.compile_step` compiles `step_fn` once for `mesh` (state donated);
      `mesh=None` means all devices on the `data` axis. `jit=False` calls `step_fn` as given (a
      host composite of compiled pieces, e.g. `make_text_reward_ppo_step`).
    - Host syncs: none inside the loop except every `log_every` steps, at checkpoints and at eval
      steps. The health metrics (loss, grad_norm, update_norm when present) of EVERY step are kept
      on device and checked at each of these syncs, before any row or checkpoint is written: a
      NaN/Inf raises `checkpoint.NonFiniteLossError` (a FloatingPointError) naming its step, and
      the last checkpoint is the last good one (so `checkpoint_every` need not be a multiple of
      `log_every`).
    - Logging: at each log step (and the last) the metrics of that step are written to
      `WORKDIR/metrics.jsonl` and TensorBoard (`MetricsWriter`) as `{"step", "loss", ...}`, and the
      tqdm bar shows the loss. `eval_fn(state, step) -> dict` runs every `eval_every` steps (and
      at the last), its values merged into that step's row as `eval/<name>`.
    - Checkpoints every `checkpoint_every` steps and at the end, with the loader's state; the
      last `keep` are kept.

    Args:
      step_fn: pure `step(state, batch) -> (state, metrics)`; metrics scalars incl. "loss".
      state: the initial state (host or device arrays); also the template for a restore.
      batches: iterator of host batches (numpy; this host's rows).
      workdir: run directory (checkpoints/, metrics.jsonl, tensorboard/).
      steps: total number of updates.
      log_every, checkpoint_every, keep: intervals and the checkpoints kept.
      mesh: the device mesh (default all devices, data-parallel).
      loader: the grain iterator whose position is checkpointed; default `batches` when it has
        `get_state`. A plain iterator is fast-forwarded by the restored step on resume.
      eval_fn, eval_every: periodic evaluation.
      desc, progress: the tqdm bar.
      jit: compile `step_fn` (True) or call it as is (False).
    Returns:
      (final state on `mesh`, every metrics row of the run so far).
    """
    from tqdm.auto import tqdm

    from rlhf_jax.checkpoint import Checkpointer, NonFiniteLossError

    if steps < 0 or log_every < 1 or checkpoint_every < 1:
        raise ValueError("need steps >= 0, log_every >= 1 and checkpoint_every >= 1")
    mesh = sh.make_mesh() if mesh is None else mesh
    workdir = Path(workdir)
    it = iter(batches)
    if loader is None and hasattr(it, "get_state"):
        loader = it
    primary = sh.is_primary()
    ckpt = Checkpointer(workdir, save_every=checkpoint_every, keep=keep)
    state = sh.shard_state(state, mesh)
    start = _restore(ckpt, state, loader)
    if start is None:
        start = _state_step(state)
    else:
        state, start = start
        if loader is None:
            for _ in range(start):  # a plain iterator: skip what the restored run consumed
                next(it)
    if start > steps:
        logger.warning("%s holds step %d, beyond --steps %d: nothing to do", workdir, start, steps)
    writer = MetricsWriter(workdir, resume_step=start, enabled=primary)
    rows = read_metrics(workdir) if primary else []
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not (progress and primary))
    compiled, pending, last_ckpt = None, [], start
    try:
        for t in range(start + 1, steps + 1):
            batch = sh.shard_batch(next(it), mesh)
            if compiled is None:
                compiled = sh.compile_step(step_fn, mesh, state, batch) if jit else step_fn
            state, metrics = compiled(state, batch)
            pending.append((t, {k: metrics[k] for k in HEALTH_METRICS if k in metrics}))
            bar.update(1)
            is_last = t == steps
            do_eval = eval_fn is not None and (is_last or (eval_every and t % eval_every == 0))
            do_log = is_last or do_eval or t % log_every == 0
            do_ckpt = is_last or t % checkpoint_every == 0
            if not (do_log or do_ckpt):
                continue
            bad = _first_bad(pending)
            pending = []
            if bad is not None:
                bt, name, value = bad
                raise NonFiniteLossError(
                    f"non-finite {name} ({value}) at step {bt}; stopped before writing anything "
                    f"after it: the last checkpoint is step {last_ckpt} in {workdir} (lower the "
                    "learning rate or check the data, then rerun to resume from there)"
                )
            if do_log:
                row = {k: v for k, v in jax.device_get(dict(metrics)).items()}
                if do_eval:
                    evals = jax.device_get(dict(eval_fn(state, t)))
                    row.update({f"eval/{k}": v for k, v in evals.items()})
                row = writer.write(t, row)
                rows.append(row)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}")
            if do_ckpt:
                data_state = None if loader is None else rdata.loader_state(loader)
                ckpt.maybe_save(t, state, data_state=data_state, force=True)
                last_ckpt = t
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return state, rows


def _restore(ckpt: Any, state: Any, loader: Any) -> tuple[Any, int] | None:
    restored = ckpt.restore_latest(state)
    if restored is None:
        return None
    step, new_state, data_state, _ = restored
    if loader is not None and data_state is not None:
        rdata.restore_loader(loader, data_state)
    return new_state, step


# ----------------------------------------------------------------------------------------------
# PPO with a reward computed on the host (text).


def make_text_reward_ppo_step(
    fns: Any,
    text_reward: Callable[[list[str]], Any],
    tokenizer: rdata.Tokenizer,
    mesh: jax.sharding.Mesh,
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """A PPO iteration whose reward is a host function of decoded text (PPO-GT: VADER), for
    `fit(..., jit=False)`: compiled rollout -> decode + `text_reward(prompt + completion texts)`
    on the host -> compiled score + update. Both programs are compiled on the first call.

    Args:
      fns: `train.make_ppo(...)` functions (reward_fn=None).
      text_reward: texts [B] -> scores [B].
      tokenizer: decodes prompt and response tokens (EOS dropped).
      mesh: the mesh `fit` runs on.
    """
    from rlhf_jax.train import response_token_lists

    def score_update(state, ro):
        return fns.update(*fns.score(state, ro))

    compiled: dict[str, Any] = {}
    rollout_sharding = sh.batch_sharding(mesh)

    def step(state: Any, batch: Any) -> tuple[Any, Any]:
        if "rollout" not in compiled:
            compiled["rollout"] = sh.compile_step(fns.rollout, mesh, state, batch)
        state, ro = compiled["rollout"](state, batch)
        rows = response_token_lists(ro, include_query=True, drop_id=tokenizer.eos_id)  # syncs
        scores = np.asarray(text_reward(tokenizer.decode_batch(rows)), np.float32)  # [B]
        ro = jax.device_put(ro.replace(scores=scores), rollout_sharding)
        if "update" not in compiled:
            compiled["update"] = sh.compile_step(score_update, mesh, state, ro)
        return compiled["update"](state, ro)

    return step
