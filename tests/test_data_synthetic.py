"""Tests of the offline sentiment task (rlhf_jax.data.synthetic and synthetic_corpus).

References are independent of the code under test: VADER's `SentimentIntensityAnalyzer` called
directly, its lexicon as the analyzer loads it, `tokenizers.Tokenizer.from_file`, NumPy ranks for
Spearman's rho, and separate Python processes for determinism.
"""

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax.data import synthetic, synthetic_corpus
from rlhf_jax.data.synthetic import (
    EOS_TOKEN,
    generate_corpus,
    generate_reviews,
    ground_truth_reward,
    load_task,
    make_prompts,
    prepare,
    split_prompts,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vader():
    return SentimentIntensityAnalyzer()


@pytest.fixture(scope="module")
def reviews():
    texts, latents = generate_reviews(0, 2000)
    return texts, np.asarray(latents)


@pytest.fixture(scope="module")
def rewards(reviews):
    return ground_truth_reward(reviews[0])


@pytest.fixture(scope="module")
def tokenizer(reviews):
    return train_tokenizer(reviews[0][:1500], vocab_size=2048)


def _ranks(x):
    """Average ranks (ties share the mean rank), for Spearman's rho."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


# ---------------------------------------------------------------------------------------------
# Corpus.

_SCRIPT = """
import hashlib
from rlhf_jax.data.synthetic import generate_corpus, train_tokenizer
texts = generate_corpus(123, 400)
print(hashlib.sha256("\\n".join(texts).encode()).hexdigest())
print(hashlib.sha256(train_tokenizer(texts, 600).to_str().encode()).hexdigest())
"""


def test_corpus_and_tokenizer_same_in_separate_processes():
    outputs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split())
    texts = generate_corpus(123, 400)
    here = [
        hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        hashlib.sha256(train_tokenizer(texts, 600).to_str().encode()).hexdigest(),
    ]
    assert outputs[0] == outputs[1] == here


def test_corpus_seeded_and_prefix_stable():
    a = generate_corpus(7, 200)
    assert a == generate_corpus(7, 200)
    assert a[:50] == generate_corpus(7, 50)  # more reviews never change the first ones
    b = generate_corpus(8, 200)
    assert sum(x == y for x, y in zip(a, b)) < 5
    assert len(set(a)) > 195


def test_texts_are_short_single_lines(reviews, tokenizer):
    texts, _ = reviews
    assert all("\n" not in t and "  " not in t and t == t.strip() for t in texts)
    assert all(t[0].isupper() and t[-1] in ".!" for t in texts)
    lengths = np.array([len(tokenizer.encode(t).ids) for t in texts])
    assert 10 <= lengths.min() and lengths.max() <= 72
    assert 20 <= lengths.mean() <= 45


def test_reward_spreads_over_minus_one_one(rewards):
    assert rewards.dtype == np.float32 and rewards.shape == (2000,)
    assert np.all((rewards >= -1) & (rewards <= 1))
    q = np.quantile(rewards, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert q[0] < -0.9 and q[4] > 0.9
    assert q[1] < -0.4 and q[3] > 0.4 and -0.3 < q[2] < 0.3  # quartiles clearly separated
    assert np.mean(rewards < -0.5) > 0.2 and np.mean(rewards > 0.5) > 0.2
    hist, _ = np.histogram(rewards, bins=10, range=(-1, 1))
    assert np.all(hist > 0.02 * len(rewards))  # every tenth of the range is populated


def test_reward_equals_direct_vader(vader, reviews):
    texts = reviews[0][:300] + [
        "",
        "The film was good.",
        "Not bad at all!!!",
        "The acting was great but the plot was dull.",
        "I hated it 😡",
        "The FILM was GREAT.",
    ]
    expected = np.array([vader.polarity_scores(t)["compound"] for t in texts], np.float32)
    np.testing.assert_array_equal(ground_truth_reward(texts), expected)
    assert ground_truth_reward([]).shape == (0,)


def test_reward_reads_negation_and_contrast(vader):
    r = ground_truth_reward(
        [
            "the film was good",
            "the film was not good",
            "the film was boring",
            "the film was never boring",
            "the acting was great but the plot was dull",
            "the plot was dull but the acting was great",
        ]
    )
    good, boring, great, dull = (vader.lexicon[w] for w in ("good", "boring", "great", "dull"))

    def compound(x):  # Hutto & Gilbert (2014): x / sqrt(x^2 + 15), rounded to 4 decimals
        return round(x / np.sqrt(x * x + 15), 4)

    negated = -0.74  # VADER's scalar for a negated word
    expected = [
        compound(good),
        compound(negated * good),
        compound(boring),
        compound(negated * boring),
        compound(0.5 * great + 1.5 * dull),  # "but": 0.5x before, 1.5x after
        compound(0.5 * dull + 1.5 * great),
    ]
    np.testing.assert_allclose(r, expected, atol=1e-6)
    assert r[0] > 0 > r[1] and r[2] < 0 < r[3] and r[4] < 0 < r[5]


def test_latent_sentiment_drives_reward_but_not_exactly(reviews, rewards):
    texts, latents = reviews
    rho = np.corrcoef(_ranks(latents), _ranks(rewards))[0, 1]
    assert 0.7 < rho < 0.99
    # The corpus is not trivial: negations and contrasts are common.
    assert np.mean([(" not " in t or " never " in t) for t in texts]) > 0.1
    assert np.mean([", but " in t for t in texts]) > 0.15
    assert np.mean([any(f" {b} " in t for b in ("very", "really", "so")) for t in texts]) > 0.15
    # Latent extremes give rewards of their sign; a band of mild latents spans both signs.
    assert np.mean(rewards[latents > 0.8] > 0.3) > 0.9
    assert np.mean(rewards[latents < -0.8] < -0.3) > 0.9
    mild = rewards[np.abs(latents) < 0.2]
    assert np.mean(mild > 0.2) > 0.1 and np.mean(mild < -0.2) > 0.1


def test_vocabulary_valences_come_from_the_lexicon(vader):
    lexicon = vader.lexicon
    for name, word_class in synthetic_corpus.vocabulary().items():
        n_words = 0
        for k, bucket in enumerate(word_class.buckets):
            for phrase in bucket:
                n_words += 1
                scored = [w for w in phrase.split() if w in lexicon]
                valence = lexicon[scored[0]] if scored else 0.0
                assert len(scored) <= 1, phrase
                assert abs(valence - word_class.valence[phrase]) < 1e-9, (name, phrase)
                assert k - 3.5 <= valence <= k - 2.5 or (k in (0, 6) and abs(valence) >= 2.5)
        assert n_words >= 8, name
        # Both polarities are available, strongly.
        assert word_class.buckets[0] + word_class.buckets[1], name
        assert word_class.buckets[5] + word_class.buckets[6], name


def test_neutral_sentences_score_zero(vader):
    for sentence in synthetic_corpus.NEUTRAL_SENTENCES:
        assert vader.polarity_scores(sentence)["compound"] == 0.0, sentence


# ---------------------------------------------------------------------------------------------
# Tokenizer and prompts.


def test_tokenizer_size_eos_and_round_trip(tmp_path, reviews, tokenizer):
    assert 300 <= tokenizer.get_vocab_size() <= 2048
    assert tokenizer.token_to_id(EOS_TOKEN) == 0
    texts = reviews[0] + ["Ünïcödé ✓ 🎬 tabs\tand\nnewlines  "]  # byte-level: anything round-trips
    encodings = tokenizer.encode_batch(texts)
    assert tokenizer.decode_batch([e.ids for e in encodings]) == texts
    # Sentiment words are whole tokens (learnable units), e.g. " great" and " boring".
    for word in ("good", "great", "bad", "boring", "not", "very", "but"):
        assert len(tokenizer.encode(" " + word).ids) == 1, word
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    reloaded = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [e.ids for e in reloaded.encode_batch(texts)] == [e.ids for e in encodings]


class _ListTokenizer:
    """A wrapper whose encode returns a plain list, like rlhf_jax.data.Tokenizer."""

    def __init__(self, backend):
        self.backend = backend

    def encode(self, text):
        return self.backend.encode(text).ids

    def decode(self, ids):
        return self.backend.decode(ids)


def test_prompts_are_two_to_eight_token_prefixes(reviews, tokenizer):
    texts = reviews[0][:500]
    pairs = split_prompts(texts, tokenizer, seed=3)
    lengths = []
    for text, (prompt, response) in zip(texts, pairs):
        ids = tokenizer.encode(text).ids
        prompt_ids = tokenizer.encode(prompt).ids
        assert prompt + response == text
        assert 2 <= len(prompt_ids) <= 8
        assert prompt_ids + tokenizer.encode(response).ids == ids
        lengths.append(len(prompt_ids))
    assert set(lengths) == set(range(2, 9))  # drawn per review over the whole range
    assert make_prompts(texts, tokenizer, seed=3) == [p for p, _ in pairs]
    assert make_prompts(texts, _ListTokenizer(tokenizer), seed=3) == [p for p, _ in pairs]
    assert make_prompts(texts, tokenizer, seed=4) != [p for p, _ in pairs]
    short = make_prompts(texts[:50], tokenizer, seed=0, min_tokens=3, max_tokens=3)
    assert all(len(tokenizer.encode(p).ids) == 3 for p in short)
    with pytest.raises(ValueError, match="tokens"):
        make_prompts(["It was good."], tokenizer, seed=0, min_tokens=4)


# ---------------------------------------------------------------------------------------------
# Preparation.

_SMALL = dict(n_train=200, n_test=40, vocab_size=1024)


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_prepare_layout_and_records(tmp_path, vader):
    root = prepare(tmp_path, seed=5, **_SMALL)
    assert root == tmp_path / "synthetic_reviews"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic_reviews"]  # no temp dirs
    assert {"meta.json", "tokenizer.json", "raw"} <= {p.name for p in root.iterdir()}
    meta = json.loads((root / "meta.json").read_text())
    assert (meta["seed"], meta["n_train"], meta["n_test"], meta["vocab_size"]) == (5, 200, 40, 1024)
    assert meta["version"] == synthetic.VERSION and meta["eos_token"] == EOS_TOKEN
    tok = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
    assert meta["tokenizer_vocab_size"] == tok.get_vocab_size() <= 1024
    assert meta["eos_id"] == tok.token_to_id(EOS_TOKEN)
    splits = {}
    for split, n in (("train", 200), ("test", 40)):
        lines = (root / "raw" / f"{split}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == n
        for r in records:
            assert set(r) == {"text", "prompt", "response", "reward"}
            assert r["prompt"] + r["response"] == r["text"] and r["response"]
            assert 2 <= len(tok.encode(r["prompt"]).ids) <= 8
            assert r["reward"] == vader.polarity_scores(r["text"])["compound"]
        rewards = [r["reward"] for r in records]
        assert meta["reward_quartiles"][split][0] == min(rewards)
        assert meta["reward_quartiles"][split][4] == max(rewards)
        splits[split] = [r["text"] for r in records]
    assert splits["train"] == generate_corpus(5, 200)
    assert not set(splits["train"]) & set(splits["test"])  # held-out reviews


def test_prepare_is_reused_rebuilt_and_atomic(tmp_path, monkeypatch):
    root = prepare(tmp_path, seed=1, **_SMALL)
    before = _snapshot(root)
    assert prepare(tmp_path, seed=1, **_SMALL) == root
    assert _snapshot(root) == before  # re-used: nothing rewritten

    # A crash while building leaves the previous preparation intact and no temp dir behind.
    def crash(texts):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(synthetic, "ground_truth_reward", crash)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(tmp_path, seed=2, **_SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic_reviews"]
    assert _snapshot(root) == before
    with pytest.raises(RuntimeError, match="killed"):
        prepare(tmp_path / "fresh", seed=2, **_SMALL)
    (tmp_path / "fresh").rmdir()  # empty: nothing half-written
    monkeypatch.undo()

    # Other arguments rebuild in place; so does an incomplete folder.
    prepare(tmp_path, seed=2, **_SMALL)
    assert json.loads((root / "meta.json").read_text())["seed"] == 2
    (root / "raw" / "test.jsonl").unlink()
    prepare(tmp_path, seed=2, **_SMALL)
    assert (root / "raw" / "test.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic_reviews"]


def test_prepare_concurrent_callers_agree(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: prepare(tmp_path, seed=3, **_SMALL), range(2)))
    assert roots[0] == roots[1] == tmp_path / "synthetic_reviews"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic_reviews"]
    assert load_task(tmp_path).meta["seed"] == 3


def test_load_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m rlhf_jax.data.synthetic"):
        load_task(tmp_path)
    root = prepare(tmp_path, seed=0, **_SMALL)
    task = load_task(tmp_path)
    assert task.data_dir == root and task.tokenizer_path == root / "tokenizer.json"
    assert len(task.train) == 200 and len(task.test) == 40
    assert task.train_prompts == [r["prompt"] for r in task.train]
    assert task.test_prompts == [r["prompt"] for r in task.test]
    assert task.meta["seed"] == 0
    texts = [r["text"] for r in task.test[:20]]
    np.testing.assert_allclose(task.reward_fn(texts), [r["reward"] for r in task.test[:20]])
    assert load_task(root).train == task.train  # the prepared folder itself works too


def test_command_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.data.synthetic", "--data-dir", str(tmp_path)]
        + ["--n-train", "200", "--n-test", "40", "--vocab-size", "800"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "reward" in done.stdout
    meta = json.loads((tmp_path / "synthetic_reviews" / "meta.json").read_text())
    assert (meta["n_train"], meta["n_test"], meta["vocab_size"]) == (200, 40, 800)
