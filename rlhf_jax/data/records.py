"""Preference, demonstration and prompt records, and strict JSONL readers for them.

A JSONL file holds one JSON object per line. The readers validate every line and never drop
anything silently: a bad line raises `BadRecordError` (file, 1-based line, what is wrong, what to
change), or with `on_bad_record="skip"` it is skipped, counted, and reported once per file through
the `rlhf_jax.data` logger (count and the first few line numbers); `read_jsonl_records` also
returns the count in a `ReadReport`.

A line is bad when it is not valid UTF-8, not valid JSON, not a JSON object, lacks a required field,
has a required field that is not a string, has an empty (or whitespace-only) required field, or,
for preferences, has `chosen` identical to `rejected`. Blank (whitespace-only) lines are ignored on
purpose, so a trailing newline or a spacer line is not an error. Fields other than the required
ones are kept in `metadata`. Files ending in `.gz` are read through gzip. Paths may be local or
cloud URLs (`gs://...`, see `rlhf_jax.paths`); `write_jsonl` writes atomically.

The Anthropic HH-RLHF layout (`chosen`/`rejected` full dialogues) is converted to single-turn
preference records as the DPO paper's code does: the prompt is the text up to and including the
last "\\n\\nAssistant:" of `chosen`, and the two responses are what follows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

from rlhf_jax import paths

__all__ = [
    "BadRecordError",
    "DemonstrationRecord",
    "HH_ASSISTANT_TAG",
    "PreferenceRecord",
    "PromptRecord",
    "ReadReport",
    "Record",
    "RECORD_KINDS",
    "hh_rlhf_to_preference",
    "iter_jsonl_objects",
    "read_demonstration_jsonl",
    "read_hh_rlhf_jsonl",
    "read_jsonl_records",
    "read_preference_jsonl",
    "read_prompt_jsonl",
    "record_from_dict",
    "record_to_dict",
    "write_jsonl",
]

logger = logging.getLogger("rlhf_jax.data")

HH_ASSISTANT_TAG = "\n\nAssistant:"
_MAX_REPORTED_LINES = 5  # line numbers named in the one-per-file skip report

OnBadRecord = Literal["error", "skip"]
RecordKind = Literal["preference", "demonstration", "prompt", "hh_rlhf"]


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """One comparison: `chosen` is preferred over `rejected` as a response to `prompt`."""

    prompt: str
    chosen: str
    rejected: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class DemonstrationRecord:
    """One supervised example: `response` is a good answer to `prompt`."""

    prompt: str
    response: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt alone, for generation (PPO rollouts, evaluation)."""

    prompt: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)


Record = PreferenceRecord | DemonstrationRecord | PromptRecord

RECORD_KINDS: dict[str, type] = {
    "preference": PreferenceRecord,
    "demonstration": DemonstrationRecord,
    "prompt": PromptRecord,
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "demonstration": ("prompt", "response"),
    "prompt": ("prompt",),
    "hh_rlhf": ("chosen", "rejected"),
}


class BadRecordError(ValueError):
    """A JSONL line that is not a valid record; the message names the file and 1-based line."""

    def __init__(self, path: str, line: int, reason: str):
        self.path, self.line, self.reason = path, line, reason
        super().__init__(
            f"{path}:{line}: {reason} (fix or remove this line, or pass on_bad_record='skip' "
            "to skip bad lines with a report)"
        )


@dataclasses.dataclass(frozen=True)
class ReadReport:
    """What a reader did with one file.

    Attributes:
      path: the file read.
      num_records: records returned.
      num_skipped: bad lines skipped (always 0 with on_bad_record="error").
      skipped_lines: 1-based line numbers of all skipped lines.
      first_reasons: why the first few skipped lines were bad (as `BadRecordError` messages).
    """

    path: str
    num_records: int
    num_skipped: int = 0
    skipped_lines: tuple[int, ...] = ()
    first_reasons: tuple[str, ...] = ()


def record_from_dict(obj: Any, kind: RecordKind) -> Record:
    """Validates one parsed JSON value and builds the record of `kind`.

    Args:
      obj: a parsed JSON value (must be a dict).
      kind: "preference", "demonstration", "prompt", or "hh_rlhf" (converted to a preference).

    Returns:
      The record; fields other than the required ones go to `metadata`.

    Raises:
      ValueError: saying what is wrong with `obj` and what it should be.
    """
    if kind not in _REQUIRED:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(_REQUIRED)}")
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if kind == "hh_rlhf":
        return hh_rlhf_to_preference(obj)
    required = _REQUIRED[kind]
    for name in required:
        if name not in obj:
            raise ValueError(
                f"missing field {name!r}; a {kind} record needs string fields "
                f"{', '.join(repr(n) for n in required)}"
            )
        value = obj[name]
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"field {name!r} is empty; it must contain text")
    if kind == "preference" and obj["chosen"] == obj["rejected"]:
        raise ValueError(
            "'chosen' is identical to 'rejected'; a preference needs two different responses"
        )
    metadata = {k: v for k, v in obj.items() if k not in required}
    return RECORD_KINDS[kind](**{name: obj[name] for name in required}, metadata=metadata)


def hh_rlhf_to_preference(record: Mapping[str, Any]) -> PreferenceRecord:
    """Converts an Anthropic HH-RLHF record to a single-turn preference record.

    prompt = `chosen` up to and including its last "\\n\\nAssistant:"; chosen/rejected = the rest of
    each dialogue (Rafailov et al. 2023 code, `extract_anthropic_prompt`). Other fields go to
    metadata.

    Raises:
      ValueError: when a field is missing, not a string or empty, when `chosen` has no
        "\\n\\nAssistant:", when `rejected` does not start with that prompt, or when the two
        responses are equal.
    """
    for name in ("chosen", "rejected"):
        if name not in record:
            raise ValueError(
                f"missing field {name!r}; an HH-RLHF record needs 'chosen' and 'rejected'"
            )
        if not isinstance(record[name], str):
            raise ValueError(f"field {name!r} must be a string, got {type(record[name]).__name__}")
    chosen_dialogue, rejected_dialogue = record["chosen"], record["rejected"]
    cut = chosen_dialogue.rfind(HH_ASSISTANT_TAG)
    if cut < 0:
        raise ValueError(f"'chosen' has no {HH_ASSISTANT_TAG!r} turn; is this HH-RLHF data?")
    prompt = chosen_dialogue[: cut + len(HH_ASSISTANT_TAG)]
    if not rejected_dialogue.startswith(prompt):
        raise ValueError(
            "'chosen' and 'rejected' do not share the dialogue up to the last "
            f"{HH_ASSISTANT_TAG!r} of 'chosen'; both must continue the same conversation"
        )
    fields = {
        "prompt": prompt,
        "chosen": chosen_dialogue[len(prompt) :],
        "rejected": rejected_dialogue[len(prompt) :],
    }
    extra = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
    return record_from_dict({**extra, **fields}, "preference")


def record_to_dict(record: Record) -> dict[str, Any]:
    """The JSON object of a record: its fields plus its metadata at the top level."""
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    metadata = fields.pop("metadata")
    clash = sorted(set(metadata) & set(fields))
    if clash:
        raise ValueError(f"metadata keys {clash} clash with record fields; rename them")
    return {**fields, **metadata}


@contextlib.contextmanager
def _open_binary(path: str | os.PathLike) -> Iterator[Any]:
    with paths.as_path(path).open("rb") as f:  # a local file or a cloud object (gs://), streamed
        if not os.fspath(path).endswith(".gz"):
            yield f
            return
        with gzip.GzipFile(fileobj=f, mode="rb") as g:
            yield g


def iter_jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yields `(line_number, value)` for each non-blank line of a JSONL file (1-based lines).

    Bytes are decoded per line, so one bad line does not hide the others; `value` is the parsed
    JSON, or a `ValueError` instance saying why the line is not valid UTF-8 or JSON (the caller
    decides whether to raise). A UTF-8 byte-order mark at the start of the file is accepted.
    """
    with _open_binary(path) as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield (
                    line_number,
                    ValueError(
                        f"invalid UTF-8 (byte {raw[e.start]:#04x} at byte offset {e.start}); "
                        "re-encode the file as UTF-8"
                    ),
                )
                continue
            if not text.strip():
                continue  # blank lines are allowed and ignored
            try:
                yield line_number, json.loads(text)
            except json.JSONDecodeError as e:
                yield line_number, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")


def read_jsonl_records(
    path: str | os.PathLike, kind: RecordKind, *, on_bad_record: OnBadRecord = "error"
) -> tuple[list[Record], ReadReport]:
    """Reads every record of a JSONL file, validating each line.

    Args:
      path: a `.jsonl` file (or `.jsonl.gz`).
      kind: "preference", "demonstration", "prompt", or "hh_rlhf" (HH dialogues converted to
        preference records).
      on_bad_record: "error" raises `BadRecordError` at the first bad line; "skip" skips bad lines
        and logs one warning per file with their count and first line numbers.

    Returns:
      (records, report).
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    path_str = os.fspath(path)
    records: list[Record] = []
    skipped: list[int] = []
    reasons: list[str] = []
    for line_number, value in iter_jsonl_objects(path_str):
        try:
            if isinstance(value, ValueError):
                raise value
            records.append(record_from_dict(value, kind))
        except ValueError as e:
            error = BadRecordError(path_str, line_number, str(e))
            if on_bad_record == "error":
                raise error from None
            skipped.append(line_number)
            if len(reasons) < _MAX_REPORTED_LINES:
                reasons.append(str(error))
    report = ReadReport(path_str, len(records), len(skipped), tuple(skipped), tuple(reasons))
    if skipped:
        shown = ", ".join(str(n) for n in skipped[:_MAX_REPORTED_LINES])
        more = ", ..." if len(skipped) > _MAX_REPORTED_LINES else ""
        logger.warning(
            "%s: skipped %d bad %s record(s) of %d (lines %s%s); first: %s",
            path_str,
            len(skipped),
            kind,
            len(skipped) + len(records),
            shown,
            more,
            reasons[0],
        )
    return records, report


def read_preference_jsonl(
    path: str | os.PathLike, *, on_bad_record: OnBadRecord = "error"
) -> list[PreferenceRecord]:
    """Reads `{"prompt", "chosen", "rejected", ...}` lines (see `read_jsonl_records`)."""
    return read_jsonl_records(path, "preference", on_bad_record=on_bad_record)[0]


def read_demonstration_jsonl(
    path: str | os.PathLike, *, on_bad_record: OnBadRecord = "error"
) -> list[DemonstrationRecord]:
    """Reads `{"prompt", "response", ...}` lines (see `read_jsonl_records`)."""
    return read_jsonl_records(path, "demonstration", on_bad_record=on_bad_record)[0]


def read_prompt_jsonl(
    path: str | os.PathLike, *, on_bad_record: OnBadRecord = "error"
) -> list[PromptRecord]:
    """Reads `{"prompt", ...}` lines (see `read_jsonl_records`)."""
    return read_jsonl_records(path, "prompt", on_bad_record=on_bad_record)[0]


def read_hh_rlhf_jsonl(
    path: str | os.PathLike, *, on_bad_record: OnBadRecord = "error"
) -> list[PreferenceRecord]:
    """Reads Anthropic HH-RLHF lines `{"chosen", "rejected"}` as single-turn preferences."""
    return read_jsonl_records(path, "hh_rlhf", on_bad_record=on_bad_record)[0]


def write_jsonl(path: str | os.PathLike, records: Iterable[Record | Mapping[str, Any]]) -> int:
    """Writes records (or plain dicts) one JSON object per line, UTF-8; returns the count.

    Metadata is written back at the top level, so `read_*_jsonl(write_jsonl(...))` round-trips.
    """
    lines = []
    for record in records:
        obj = dict(record) if isinstance(record, Mapping) else record_to_dict(record)
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    paths.write_text_atomic(path, "".join(lines))
    return len(lines)
