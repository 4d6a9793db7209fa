"""Data: preference records, tokenizers, chat templates, TRL's dataset formats (`formats`,
`encode`), TFDS builders, grain loaders (and the synthetic task).

Records and tokenization are imported eagerly (light); the TFDS and grain names load their module
on first use, so `import rlhf_jax.data` stays fast. The offline sentiment task is the submodule
`rlhf_jax.data.synthetic` (import it by that name).
"""

import importlib

from rlhf_jax.data.encode import Truncation, encode_dataset
from rlhf_jax.data.formats import Dataset, load_dataset
from rlhf_jax.data.records import (
    HH_ASSISTANT_TAG,
    RECORD_KINDS,
    BadRecordError,
    DemonstrationRecord,
    PreferenceRecord,
    PromptRecord,
    ReadReport,
    Record,
    hh_rlhf_to_preference,
    iter_jsonl_objects,
    read_demonstration_jsonl,
    read_hh_rlhf_jsonl,
    read_jsonl_records,
    read_preference_jsonl,
    read_prompt_jsonl,
    record_from_dict,
    record_to_dict,
    write_jsonl,
)
from rlhf_jax.data.tokenization import (
    DEFAULT_BUCKETS,
    Tokenizer,
    bucket_length,
    collate_demonstrations,
    collate_preferences,
    collate_prompts,
    load_tokenizer,
    tokenize_demonstration,
    tokenize_preference,
    tokenize_prompts,
)
from rlhf_jax.data.unpaired import as_unpaired, collate_unpaired, unpair_preferences

_LAZY = {
    "rlhf_jax.data.tfds_builders": (
        "LocalPreferences",
        "LocalPreferencesConfig",
        "PrefixPromptSource",
        "SyntheticReviews",
        "imdb_prompt_source",
        "prepare_dataset",
        "synthetic_raw_dir",
    ),
    "rlhf_jax.data.loaders": (
        "DEFAULT_READ_OPTIONS",
        "host_shard",
        "loader_state",
        "make_dataset",
        "make_loader",
        "restore_loader",
    ),
    "rlhf_jax.data.tasks": ("default_data_dir", "task_loaders", "task_tokenizer"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name):
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'rlhf_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_NAMES))


__all__ = [
    "BadRecordError",
    "DEFAULT_BUCKETS",
    "Dataset",
    "DemonstrationRecord",
    "HH_ASSISTANT_TAG",
    "PreferenceRecord",
    "PromptRecord",
    "RECORD_KINDS",
    "ReadReport",
    "Record",
    "Tokenizer",
    "Truncation",
    "bucket_length",
    "collate_demonstrations",
    "collate_preferences",
    "collate_unpaired",
    "as_unpaired",
    "unpair_preferences",
    "collate_prompts",
    "encode_dataset",
    "hh_rlhf_to_preference",
    "iter_jsonl_objects",
    "load_dataset",
    "load_tokenizer",
    "read_demonstration_jsonl",
    "read_hh_rlhf_jsonl",
    "read_jsonl_records",
    "read_preference_jsonl",
    "read_prompt_jsonl",
    "record_from_dict",
    "record_to_dict",
    "tokenize_demonstration",
    "tokenize_preference",
    "tokenize_prompts",
    "write_jsonl",
    *_LAZY_NAMES,
]
