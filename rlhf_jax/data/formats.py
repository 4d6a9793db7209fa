"""Datasets in the formats researchers already have: TRL's documented dataset types, recognised
from their column names, read from local JSONL / Parquet files or a prepared TFDS dataset.

    ds = load_dataset("pairs.jsonl", kinds=("preference",))   # .parquet, tfds:NAME[/CONFIG][:SPLIT]
    ds = load_dataset("gsm8k.jsonl", columns="prompt=question")     # rename: TRL name=your column
    ds.kind, ds.conversational, ds.rows[0]["prompt"], ds.rows[0]["answer"]

| type | standard | conversational |
|---|---|---|
| language modeling | `{"text": str}` | `{"messages": [{"role", "content"}, ...]}` |
| prompt-only | `{"prompt": str}` | `{"prompt": [messages]}` |
| prompt-completion | `{"prompt": str, "completion": str}` | both lists of messages |
| preference | `{"prompt", "chosen", "rejected"}` | the three as lists of messages |
| implicit-prompt preference | `{"chosen", "rejected"}`: the shared start is the prompt | same |
| unpaired preference | `{"prompt", "completion", "label": bool}` | prompt and completion lists |

The type is the first of these whose columns a dataset has: chosen + rejected (preference),
prompt + completion + label (unpaired preference), prompt + completion, messages or text
(language modeling), prompt (prompt-only). A dataset is conversational when its first row's fields
are lists of messages, and every row must then be. An implicit prompt is split off as the
messages both transcripts share (conversational) or their common text up to the whitespace
before the first difference (standard: the completions start with that whitespace, as in
Anthropic HH's "...Assistant:" + " reply"). Columns beside the type's stay in each row (a reward
function reads them, e.g. a ground-truth `answer`).

Every error names the file and line (or row) and the field, and what to change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax import paths
from rlhf_jax.data import chat
from rlhf_jax.data.records import iter_jsonl_objects

KINDS = (
    "language_modeling",
    "prompt_only",
    "prompt_completion",
    "preference",
    "unpaired_preference",
)
TRL_COLUMNS = ("text", "messages", "prompt", "completion", "chosen", "rejected", "label")
# kind -> the fields holding text or messages
TEXT_FIELDS = {
    "language_modeling": ("text",),
    "prompt_only": ("prompt",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion"),
}
_NAMES = {k: k.replace("_", "-") for k in KINDS}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset's rows (dicts under TRL's column names, other columns kept), its type (`KINDS`),
    whether its fields are messages, and where each row came from (`where[i]`: "FILE:LINE")."""

    rows: list[dict[str, Any]]
    kind: str
    conversational: bool
    source: str
    where: list[str]

    def __len__(self) -> int:
        return len(self.rows)


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """`"prompt=question,completion=answer"` (or a mapping) -> {TRL name: the dataset's column}.

    Raises:
      ValueError: an entry that is not NAME=COLUMN, or a NAME that is not one of TRL's columns.
    """
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, Mapping) else []
    if isinstance(spec, str):
        for entry in filter(None, (e.strip() for e in spec.split(","))):
            name, sep, column = entry.partition("=")
            if not (sep and name.strip() and column.strip()):
                raise ValueError(f"columns: {entry!r} is not NAME=COLUMN (e.g. prompt=question)")
            items.append((name.strip(), column.strip()))
    out = dict(items)
    unknown = sorted(set(out) - set(TRL_COLUMNS))
    if unknown:
        raise ValueError(
            f"columns: {', '.join(unknown)} is not a TRL column name; rename to one of "
            f"{', '.join(TRL_COLUMNS)}"
        )
    return out


def detect_kind(names: Iterable[str]) -> str | None:
    """The dataset type of a set of column names (None: none of TRL's types)."""
    names = set(names)
    if {"chosen", "rejected"} <= names:
        return "preference"
    if {"prompt", "completion", "label"} <= names:
        return "unpaired_preference"
    if {"prompt", "completion"} <= names:
        return "prompt_completion"
    if names & {"messages", "text"}:
        return "language_modeling"
    if "prompt" in names:
        return "prompt_only"
    return None


# ----------------------------------------------------------------------------------------------
# Reading rows.


def _plain(value: Any) -> Any:
    """TFDS / Parquet values as JSON-like Python: bytes decoded, arrays as lists, a sequence of
    dicts stored column-wise ({"role": [...], "content": [...]}) as a list of dicts."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        value = {k: _plain(v) for k, v in value.items()}
        lists = [v for v in value.values() if isinstance(v, list)]
        if lists and len(lists) == len(value) and len({len(v) for v in lists}) == 1:
            return [dict(zip(value, items)) for items in zip(*value.values())]
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _read_jsonl(path: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    for line, value in iter_jsonl_objects(path):
        if isinstance(value, ValueError):
            raise ValueError(f"{path}:{line}: {value}")
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
        rows.append(value)
        where.append(f"{path}:{line}")
    return rows, where


def _read_parquet(path: str) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    with paths.as_path(path).open("rb") as f:
        table = pq.read_table(f)
    rows = [_plain(r) for r in table.to_pylist()]
    return rows, [f"{path} row {i + 1}" for i in range(len(rows))]


def _read_tfds(spec: str) -> tuple[list[dict], list[str]]:
    body = spec[len("tfds:") :]
    name, split = body.rsplit(":", 1) if ":" in body else (body, "train")
    if not (name and split):
        raise ValueError(f"{spec}: expected tfds:NAME[/CONFIG][:SPLIT]")
    import tensorflow_datasets as tfds  # a prepared dataset reads without its builder's code

    try:
        source = tfds.data_source(
            name, split=split, data_dir=os.environ.get("TFDS_DATA_DIR"), download=False
        )  # reads a prepared dataset: nothing is downloaded or built here
    except Exception as e:  # not prepared, an unknown name or split
        raise ValueError(
            f"{spec}: cannot open the prepared TFDS dataset ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); prepare it first (tfds build, or "
            "set TFDS_DATA_DIR to where it is)"
        ) from None
    rows = [_plain(dict(source[i])) for i in range(len(source))]
    return rows, [f"{spec} row {i + 1}" for i in range(len(rows))]


def read_rows(spec: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows as dicts, where each came from) of a `.jsonl` / `.jsonl.gz` / `.parquet` file (local
    or cloud) or `tfds:NAME[/CONFIG][:SPLIT]` (a dataset prepared in `$TFDS_DATA_DIR`, read with
    `tfds.data_source`; split "train" by default).

    Raises:
      ValueError: an unknown kind of path, a missing file, or a line that is not a JSON object.
    """
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        return _read_tfds(spec)
    if not spec.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        raise ValueError(f"{spec}: expected a .jsonl, .jsonl.gz or .parquet file, or tfds:NAME")
    if not paths.as_path(spec).is_file():
        raise ValueError(f"{spec}: no such file")
    return _read_parquet(spec) if spec.endswith(".parquet") else _read_jsonl(spec)


# ----------------------------------------------------------------------------------------------
# Recognising and checking.


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a preference pair whose prompt is inside both transcripts:
    the messages both share, or their common text up to the whitespace before the first
    difference (the completions keep that whitespace)."""
    if isinstance(chosen, list):
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        return chosen[:k], chosen[k:], rejected[k:]
    if chosen == rejected:
        return chosen, "", ""
    k = len(os.path.commonprefix([chosen, rejected]))
    while k > 0 and not chosen[k - 1].isspace():
        k -= 1  # back to the word's start
    while k > 0 and chosen[k - 1].isspace():
        k -= 1  # the completions start with the whole whitespace run
    return chosen[:k], chosen[k:], rejected[k:]


def _check_field(value: Any, conversational: bool, where: str, field: str) -> Any:
    if conversational:
        return chat.check_messages(value, f"{where}: {field!r}")
    if not isinstance(value, str):
        form = "messages (a conversational row)" if isinstance(value, list) else "not text"
        raise ValueError(
            f"{where}: {field!r} is {form}; every row of a dataset must have the first row's form "
            "(text, or lists of {role, content} messages)"
        )
    return value


def _check_row(row: dict, kind: str, conversational: bool, where: str) -> dict:
    for field in TEXT_FIELDS[kind]:
        if field == "prompt" and kind == "preference" and field not in row:
            continue  # implicit prompt
        if kind == "language_modeling":
            field = "messages" if conversational else "text"
        if field not in row or row[field] is None:
            raise ValueError(f"{where}: no {field!r} (a {_NAMES[kind]} dataset needs it)")
        row[field] = _check_field(row[field], conversational, where, field)
    if kind == "preference" and "prompt" not in row:
        row["prompt"], row["chosen"], row["rejected"] = split_implicit_prompt(
            row["chosen"], row["rejected"]
        )
        if not (row["chosen"] or row["rejected"]):
            raise ValueError(f"{where}: 'chosen' and 'rejected' are the same")
    if kind == "unpaired_preference":
        label = row.get("label")
        if not (isinstance(label, bool) or label in (0, 1)):
            raise ValueError(f"{where}: 'label' must be true or false, got {label!r}")
        row["label"] = bool(label)
    return row


def load_dataset(
    spec: str | os.PathLike,
    *,
    columns: str | Mapping[str, str] | None = None,
    kinds: Sequence[str] = KINDS,
    flag: str = "dataset",
) -> Dataset:
    """Reads, renames (`columns`: {TRL name: the dataset's column}, or "NAME=COLUMN,..."),
    recognises and checks a dataset of one of `kinds`.

    Raises:
      ValueError: naming `flag`, the file and line and the field: no rows, columns of no TRL type
        or of a type not in `kinds`, a row without a field its type needs or in another form.
    """
    renames = parse_columns(columns)
    raw, where = read_rows(spec)
    source = os.fspath(spec)
    if not raw:
        raise ValueError(f"{source}: no rows")
    missing = sorted(c for c in renames.values() if c not in raw[0])
    if missing:
        raise ValueError(
            f"{where[0]}: no column {', '.join(map(repr, missing))} (its columns: "
            f"{', '.join(raw[0])}); fix --columns"
        )
    back = {column: name for name, column in renames.items()}
    rows = [{back.get(k, k): v for k, v in r.items()} for r in raw]
    kind = detect_kind(rows[0])
    wanted = " or ".join(_NAMES[k] for k in kinds)
    half = {"chosen", "rejected"} & set(rows[0])
    if len(half) == 1 and "preference" in kinds:
        (other,) = {"chosen", "rejected"} - half
        raise ValueError(f"{where[0]}: no {other!r} (a preference dataset needs it)")
    if kind is None or kind not in kinds:
        found = "no TRL dataset type" if kind is None else f"a {_NAMES[kind]} dataset"
        raise ValueError(
            f"{source}: {found} (columns: {', '.join(raw[0])}); this run needs {wanted} data, "
            f"recognised by TRL's column names ({', '.join(TRL_COLUMNS)}): rename yours with "
            "--columns NAME=COLUMN"
        )
    probe = rows[0].get("messages" if "messages" in rows[0] else TEXT_FIELDS[kind][-1])
    conversational = isinstance(probe, list)
    checked = [_check_row(r, kind, conversational, w) for r, w in zip(rows, where)]
    return Dataset(checked, kind, conversational, source, where)
