"""TFDS datasets in ArrayRecord format (no TensorFlow needed), and prompt sources over them.

Builders (importing this module registers them with TFDS):

- `synthetic_reviews`: the offline sentiment task (`rlhf_jax.data.synthetic`). It reads the raw
  files that `rlhf_jax.data.synthetic.prepare(data_dir)` writes,

      {data_dir}/synthetic_reviews/raw/train.jsonl
      {data_dir}/synthetic_reviews/raw/test.jsonl

  one object per line `{"text": str, "prompt": str, "response": str, "reward": float}`, into
  `{data_dir}/synthetic_reviews/1.0.0/` with features text/prompt/response (Text) and reward
  (float32); splits train and test.
- `local_preferences`: preference pairs from local JSONL files (e.g. HH-RLHF downloaded by the
  user) put in the manual folder: each `{split}.jsonl` or `{split}.jsonl.gz` there becomes a split.
  Config `default`: lines `{"prompt", "chosen", "rejected"}`; config `hh_rlhf`: Anthropic
  HH-RLHF lines `{"chosen", "rejected"}` converted as in `records.hh_rlhf_to_preference`.
  Features prompt/chosen/rejected (Text). Bad lines raise `BadRecordError`; the configs
  `default_skip_bad` and `hh_rlhf_skip_bad` skip them instead (counted and logged once per file).

TFDS stores examples in the order of its hashed keys, not file order; the loaders shuffle anyway.

Text features come back from `tfds.data_source` as UTF-8 bytes; the collate functions accept them.

`PrefixPromptSource` turns a source of texts (TFDS `imdb_reviews`, or the synthetic reviews) into
the 2-8 token prompts of the DPO paper's IMDb experiment (Rafailov et al. 2023, sec. 6.1).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import records as records_lib
from rlhf_jax.data.tokenization import Tokenizer

__all__ = [
    "LocalPreferences",
    "LocalPreferencesConfig",
    "PrefixPromptSource",
    "SYNTHETIC_RAW_SPLITS",
    "SyntheticReviews",
    "imdb_prompt_source",
    "prepare_dataset",
    "synthetic_raw_dir",
]

SYNTHETIC_RAW_SPLITS = ("train", "test")


def synthetic_raw_dir(data_dir: str | os.PathLike) -> str:
    """Where `synthetic_reviews` expects its raw JSONL files: `{data_dir}/synthetic_reviews/raw`."""
    return os.path.join(os.fspath(data_dir), "synthetic_reviews", "raw")


def _reward(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"field 'reward' must be a finite number, got {value!r}")
    return float(value)


def _synthetic_examples(path: str):
    for line, obj in records_lib.iter_jsonl_objects(path):
        try:
            if isinstance(obj, ValueError):
                raise obj
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            example = {}
            for name in ("text", "prompt", "response"):
                if not isinstance(obj.get(name), str):
                    raise ValueError(f"field {name!r} must be present and a string")
                example[name] = obj[name]
            example["reward"] = _reward(obj.get("reward"))
        except ValueError as e:
            raise records_lib.BadRecordError(path, line, str(e)) from None
        yield line, example


class SyntheticReviews(tfds.core.GeneratorBasedBuilder):
    """The offline stand-in for IMDb: short generated reviews with a VADER reward."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Generated movie-review-like texts (rlhf_jax.data.synthetic) with a prompt "
                "(2-8 token prefix), the rest as response, and the VADER compound sentiment of "
                "the text as reward."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "prompt": tfds.features.Text(),
                    "response": tfds.features.Text(),
                    "reward": tfds.features.Scalar(dtype=np.float32),
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the raw files are generated locally
        raw = synthetic_raw_dir(self.data_dir_root)
        files = {s: os.path.join(raw, f"{s}.jsonl") for s in SYNTHETIC_RAW_SPLITS}
        missing = [f for f in files.values() if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"synthetic_reviews needs {missing}; write them first with "
                f"`python -m rlhf_jax.data.synthetic --data-dir {self.data_dir_root}`"
            )
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path: str):
        yield from _synthetic_examples(path)


@dataclasses.dataclass
class LocalPreferencesConfig(tfds.core.BuilderConfig):
    """Config of `local_preferences`.

    Attributes:
      layout: "preference" (prompt/chosen/rejected lines) or "hh_rlhf" (HH-RLHF dialogues).
      on_bad_record: "error" or "skip" (skipped lines are counted and logged once per file).
    """

    layout: str = "preference"
    on_bad_record: str = "error"


class LocalPreferences(tfds.core.GeneratorBasedBuilder):
    """Preference pairs from local JSONL files given through `manual_dir`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        LocalPreferencesConfig(name="default", description="prompt/chosen/rejected lines"),
        LocalPreferencesConfig(
            name="hh_rlhf",
            layout="hh_rlhf",
            description="Anthropic HH-RLHF lines (chosen/rejected dialogues), single-turn",
        ),
        LocalPreferencesConfig(
            name="default_skip_bad",
            on_bad_record="skip",
            description="as default, bad lines skipped (counted and logged once per file)",
        ),
        LocalPreferencesConfig(
            name="hh_rlhf_skip_bad",
            layout="hh_rlhf",
            on_bad_record="skip",
            description="as hh_rlhf, bad lines skipped (counted and logged once per file)",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put one JSONL file per split in the manual folder, named {split}.jsonl or "
        "{split}.jsonl.gz (e.g. train.jsonl.gz and test.jsonl.gz of Anthropic/hh-rlhf for the "
        "hh_rlhf config), and pass the folder as DownloadConfig(manual_dir=...)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Pairwise preferences read from local JSONL files.",
            features=tfds.features.FeaturesDict(
                {name: tfds.features.Text() for name in ("prompt", "chosen", "rejected")}
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        folder = os.fspath(dl_manager.manual_dir)
        files: dict[str, str] = {}
        for path in sorted(glob.glob(os.path.join(folder, "*.jsonl*"))):
            name = os.path.basename(path)
            for suffix in (".jsonl", ".jsonl.gz"):
                if name.endswith(suffix):
                    split = name[: -len(suffix)]
                    if split in files:
                        raise ValueError(f"two files for split {split!r} in {folder}")
                    files[split] = path
        if not files:
            raise FileNotFoundError(f"no *.jsonl or *.jsonl.gz files in {folder}")
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path: str):
        kind = "hh_rlhf" if self.builder_config.layout == "hh_rlhf" else "preference"
        records, _ = records_lib.read_jsonl_records(
            path, kind, on_bad_record=self.builder_config.on_bad_record
        )
        for i, r in enumerate(records):
            yield i, {"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}


def prepare_dataset(
    name: str,
    data_dir: str | os.PathLike,
    *,
    manual_dir: str | os.PathLike | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds a TFDS dataset into `data_dir` in ArrayRecord format (a no-op when already built).

    Args:
      name: "synthetic_reviews", "local_preferences", "local_preferences/hh_rlhf", ...
      data_dir: the TFDS data folder.
      manual_dir: the folder of local files for builders that need one.

    Returns:
      The builder; read it with `tfds.data_source(name, split=..., data_dir=data_dir)`.
    """
    builder = tfds.builder(name, data_dir=os.fspath(data_dir), file_format="array_record")
    config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir)
    )
    builder.download_and_prepare(download_config=config)
    return builder


class PrefixPromptSource(Sequence):
    """Random-access prompts made of the first 2-8 tokens of each text of a source.

    Element i is `{"prompt": str, "prompt_ids": int32 [k], "index": i}` plus the source's other
    non-text fields (e.g. IMDb's label), where k is drawn uniformly in [min_tokens, max_tokens] from
    a generator seeded by (seed, i): the same for every order of access and every host. A text
    shorter than k tokens gives all its tokens. HTML line breaks ("<br />", frequent in IMDb) are
    replaced by spaces first when `strip_html_breaks`. `collate_prompts` uses "prompt_ids" as is.

    Args:
      texts: a random-access source of mappings with a text field (e.g. `tfds.data_source(...)`).
      tokenizer: the policy's tokenizer.
      seed: seeds the prefix lengths.
      min_tokens, max_tokens: inclusive range of prefix lengths (DPO paper: 2 and 8).
      text_key: the field holding the text.
    """

    def __init__(
        self,
        texts: Sequence[Any],
        tokenizer: Tokenizer,
        *,
        seed: int = 0,
        min_tokens: int = 2,
        max_tokens: int = 8,
        text_key: str = "text",
        strip_html_breaks: bool = True,
    ):
        if not 1 <= min_tokens <= max_tokens:
            raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
        self.texts, self.tokenizer = texts, tokenizer
        self.seed, self.min_tokens, self.max_tokens = seed, min_tokens, max_tokens
        self.text_key, self.strip_html_breaks = text_key, strip_html_breaks

    def __len__(self) -> int:
        return len(self.texts)

    def prefix_length(self, index: int | np.integer) -> int:
        """The number of tokens drawn for element `index`."""
        rng = np.random.default_rng([self.seed, int(index)])
        return int(rng.integers(self.min_tokens, self.max_tokens + 1))

    def __getitem__(self, index: int | np.integer) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} prompts")
        example = self.texts[index]
        text = _as_text(example[self.text_key])
        if self.strip_html_breaks:
            text = text.replace("<br />", " ").replace("<br/>", " ")
        ids = self.tokenizer.encode(text)[: self.prefix_length(index)]
        out = {
            k: v
            for k, v in example.items()
            if k != self.text_key and not isinstance(v, str | bytes)
        }
        out.update(
            prompt=self.tokenizer.decode(ids),
            prompt_ids=np.asarray(ids, np.int32),
            index=index,
        )
        return out

    def __repr__(self) -> str:
        return (
            f"PrefixPromptSource(n={len(self)}, tokens={self.min_tokens}..{self.max_tokens}, "
            f"seed={self.seed})"
        )


def _as_text(value: Any) -> str:
    """Text of a TFDS Text value (bytes, str, or a 0-d numpy array of either)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def imdb_prompt_source(
    tokenizer: Tokenizer,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    min_tokens: int = 2,
    max_tokens: int = 8,
) -> PrefixPromptSource:
    """Prompts from TFDS `imdb_reviews` as in the DPO paper: 2-8 token prefixes of reviews.

    Needs `imdb_reviews` prepared by the user in ArrayRecord format, e.g.
    `tfds.builder("imdb_reviews", data_dir=D, file_format="array_record").download_and_prepare()`
    on a machine with network access (this function never downloads).
    """
    source = tfds.data_source(
        "imdb_reviews",
        split=split,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=False,
    )
    return PrefixPromptSource(
        source, tokenizer, seed=seed, min_tokens=min_tokens, max_tokens=max_tokens
    )
