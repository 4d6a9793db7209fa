"""Unpaired preference batches for KTO: rows of (prompt, completion, label) and, for the reference
point, the batch's mismatched prompt-completion pairs.

    batch = collate_unpaired(records, tokenizer, max_length=64, max_prompt_length=16)
    batch["tokens"], batch["loss_mask"], batch["desirable"]    # the rows
    batch["kl_tokens"], batch["kl_loss_mask"]                   # row i's completion after the
                                                                # prompt of row (i + 1) % B

Records are the rows of `data.encode_dataset` for an unpaired dataset (prompt_ids,
completion_ids, label), mappings / objects with prompt, completion, label (text, tokenized here
with EOS after the completion when it fits), or preference records split in two
(`unpair_preferences`: TRL's `unpair_preference_dataset`). Rows are right-padded to `max_length`;
a mismatched pair longer than `max_length` loses its completion's end (it only estimates the
reference point).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data import tokenization as tok_lib


def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def unpair_preferences(records: Sequence[Any]) -> list[dict[str, Any]]:
    """Each preference record (prompt, chosen, rejected; text, or encoded prompt_ids /
    chosen_ids / rejected_ids) as two unpaired rows: the chosen completion desirable, the
    rejected one not, in that order."""
    out = []
    for r in records:
        if isinstance(r, Mapping) and "chosen_ids" in r:
            p = list(r["prompt_ids"])
            out.append({"prompt_ids": p, "completion_ids": list(r["chosen_ids"]), "label": True})
            out.append({"prompt_ids": p, "completion_ids": list(r["rejected_ids"]), "label": False})
        else:
            p = _field(r, "prompt")
            out.append({"prompt": p, "completion": _field(r, "chosen"), "label": True})
            out.append({"prompt": p, "completion": _field(r, "rejected"), "label": False})
    return out


def _has(record: Any, name: str) -> bool:
    return name in record if isinstance(record, Mapping) else hasattr(record, name)


def as_unpaired(records: Sequence[Any]) -> list[Any]:
    """`records` as unpaired rows: rows with a label as they are, preference records (chosen /
    rejected, text or encoded) split in two (`unpair_preferences`).

    Raises:
      ValueError: records of neither kind, or of both.
    """
    labelled = [_has(r, "label") for r in records]
    if all(labelled):
        return list(records)
    if not any(labelled) and all(_has(r, "chosen") or _has(r, "chosen_ids") for r in records):
        return unpair_preferences(records)
    raise ValueError(
        "KTO trains on unpaired rows (prompt, completion, label) or preference pairs (split "
        "in two): these records are neither, or a mix"
    )


def _ids(records: Sequence[Any], tokenizer: Any, max_prompt_length: int) -> list[tuple]:
    """(prompt ids, completion ids, completion already ends as encoded, label) of each record."""
    out = []
    for r in records:
        if isinstance(r, Mapping) and "completion_ids" in r:
            p, c = list(r["prompt_ids"]), list(r["completion_ids"])
            out.append((p, c, True, bool(r["label"])))
        else:
            p = tokenizer.encode(tok_lib.text_field(r, "prompt"))[-max_prompt_length:]
            c = tokenizer.encode(tok_lib.text_field(r, "completion"))
            out.append((p, c, False, bool(_field(r, "label"))))
    return out


def _joined(prompt: list[int], completion: list[int], encoded: bool, eos: int, max_length: int):
    if encoded:  # data.encode's rows carry their EOS and were cut as the run asked
        completion = completion[: max(max_length - len(prompt), 0)]
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    return tok_lib.response_row(prompt, completion, eos, max_length)


def collate_unpaired(
    records: Sequence[Any],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    buckets: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """A KTO batch (module doc): `tokens`, `attention_mask`, `loss_mask` and the same three with
    the `kl_` prefix, int32 [B, T], and `desirable` int32 [B]. Needs B >= 2 (a row's mismatched
    pair is another row's prompt)."""
    rows = _ids(records, tokenizer, max_prompt_length)
    if len(rows) < 2:
        raise ValueError("an unpaired batch needs at least 2 rows (the mismatched pairs)")
    eos = tokenizer.eos_id
    own = [_joined(p, c, e, eos, max_length) for p, c, e, _ in rows]
    n = len(rows)
    mismatched = [
        _joined(rows[(i + 1) % n][0], rows[i][1], rows[i][2], eos, max_length) for i in range(n)
    ]
    longest = max(len(r[0]) for r in own + mismatched)
    length = tok_lib.bucket_length(longest, buckets, max_length)
    return {
        **tok_lib.stack_rows(own, length, tokenizer.pad_id),
        **tok_lib.stack_rows(mismatched, length, tokenizer.pad_id, "kl_"),
        "desirable": np.asarray([r[3] for r in rows], np.int32),
    }
