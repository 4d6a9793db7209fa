"""The offline task's data as loaders: tokenizer, demonstration / preference / prompt batches.

tok = task_tokenizer(task)
loader = task_loaders(task, "demonstration", batch_size=16, max_length=64,
                      max_prompt_length=63, seed=0)
batch = next(loader)        # fixed shapes: a compiled step sees one shape
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_jax.data import loaders as _loaders
from rlhf_jax.data import tokenization as _tok
from rlhf_jax.data import unpaired as _unpaired

KINDS = ("demonstration", "preference", "prompt", "unpaired")


@functools.cache
def _tokenizer(path: str) -> _tok.Tokenizer:
    return _tok.load_tokenizer(path)


def task_tokenizer(task: Any) -> _tok.Tokenizer:
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
    tokenizer: _tok.Tokenizer | None = None,
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
      "unpaired": `records` (required) of (prompt, completion, label) for KTO, with each row's
        mismatched pair (`data.collate_unpaired`), [B, max_length].
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
        if kind in ("preference", "unpaired"):
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
        collate = _tok.collate_prompts
    else:
        collate = {
            "demonstration": _tok.collate_demonstrations,
            "preference": _tok.collate_preferences,
            "unpaired": _unpaired.collate_unpaired,
        }[kind]
        lengths["max_length"] = max_length
    batch_fn = functools.partial(collate, tokenizer=tok, buckets=None, **lengths)
    return _loaders.make_loader(
        list(records),
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        batch_fn=batch_fn,
    )


def default_data_dir(anchor: str | os.PathLike) -> str:
    """`$RLHF_JAX_DATA`, else `data/` in the repository holding `anchor` (a driver's __file__)."""
    return os.environ.get("RLHF_JAX_DATA") or str(Path(anchor).resolve().parents[1] / "data")
