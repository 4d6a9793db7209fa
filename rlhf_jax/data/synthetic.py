"""The offline sentiment task standing in for IMDb (DPO paper, Rafailov et al. 2023, Fig. 2 left).

A seeded corpus of short movie reviews (`rlhf_jax.data.synthetic_corpus`), a byte-level BPE
tokenizer trained on it, prompts that are 2-8 token prefixes of the reviews, and the ground-truth
reward: VADER's compound sentiment (Hutto & Gilbert 2014) of prompt + completion, standing where the
paper uses a sentiment classifier.

Prepare once (cached under ``DIR/synthetic_reviews/``, re-used when present)::

    python -m rlhf_jax.data.synthetic --data-dir DIR

Layout: ``raw/{train,test}.jsonl`` (one ``{"text", "prompt", "response", "reward"}`` per line, so
they double as demonstration records), ``tokenizer.json`` and ``meta.json``. The folder is local
(a cloud URL is refused): each host of a pod prepares its own copy.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from jaxtyping import Float
from tokenizers import decoders, models, pre_tokenizers, trainers
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax.data.synthetic_corpus import generate_corpus, generate_reviews

__all__ = [
    "EOS_TOKEN",
    "SyntheticTask",
    "generate_corpus",
    "generate_reviews",
    "ground_truth_reward",
    "load_task",
    "make_prompts",
    "prepare",
    "split_prompts",
    "train_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"  # end of text and padding, as in GPT-2
VERSION = 1  # bump when the generator, tokenizer recipe or layout changes
DIRNAME = "synthetic_reviews"
DEFAULT_N_TRAIN = 40_000
DEFAULT_N_TEST = 4_000
DEFAULT_VOCAB_SIZE = 2048  # an upper bound: the corpus saturates at about 1.2k tokens
_FILES = ("meta.json", "tokenizer.json", "raw/train.jsonl", "raw/test.jsonl")


# ---------------------------------------------------------------------------------------------
# Ground-truth reward.


@functools.cache
def _analyzer() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()  # reads the lexicon once (~20 ms); pure Python after


def ground_truth_reward(texts: Sequence[str]) -> Float[np.ndarray, " B"]:
    """VADER compound sentiment of each text, the stand-in for the paper's sentiment classifier.

    compound = x / sqrt(x^2 + 15), x = sum of rule-adjusted lexicon valences (Hutto & Gilbert
    2014), rounded by VADER to 4 decimals. Pure Python, one analyzer re-used: 3-7k reviews/s
    on one CPU core, measured (no process pool: the target machine has 2 shared cores).

    Args:
        texts: B decoded prompt + completion strings.

    Returns:
        [B] float32 in [-1, 1].
    """
    score = _analyzer().polarity_scores
    return np.fromiter((score(t)["compound"] for t in texts), np.float32, count=len(texts))


# ---------------------------------------------------------------------------------------------
# Tokenizer and prompts.


def train_tokenizer(
    texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 recipe) trained on `texts`, with `EOS_TOKEN` as id 0.

    Byte-level: every string round-trips exactly; the vocabulary is 256 bytes + EOS + merges, at
    most `vocab_size` (fewer when the corpus runs out of pairs seen twice).
    """
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _as_ids(out: Any) -> list[int]:
    """Ids of a `tokenizers.Encoding`, or a list of ids as such."""
    return list(out.ids if hasattr(out, "ids") else out)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return _as_ids(tokenizer.encode(text))


def _ids_batch(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Batched (multi-threaded in `tokenizers`) when the tokenizer has `encode_batch`."""
    if hasattr(tokenizer, "encode_batch"):
        return [_as_ids(out) for out in tokenizer.encode_batch(list(texts))]
    return [_ids(tokenizer, t) for t in texts]


def _decode_batch(tokenizer: Any, ids: Sequence[Sequence[int]]) -> list[str]:
    if hasattr(tokenizer, "decode_batch"):
        return list(tokenizer.decode_batch([list(i) for i in ids]))
    return [tokenizer.decode(list(i)) for i in ids]


def _cut(tokenizer: Any, ids: list[int], n: int) -> tuple[str, str] | None:
    """(prompt, response) decoded from ids[:n], ids[n:] if both re-encode to the same ids."""
    prompt, response = tokenizer.decode(ids[:n]), tokenizer.decode(ids[n:])
    if _ids(tokenizer, prompt) == ids[:n] and _ids(tokenizer, response) == ids[n:]:
        return prompt, response
    return None


def split_prompts(
    texts: Sequence[str],
    tokenizer: Any,
    seed: int | Sequence[int],
    min_tokens: int = 2,
    max_tokens: int = 8,
) -> list[tuple[str, str]]:
    """Split each text into (prompt, response) with a prompt of 2-8 tokens, as the DPO paper does.

    The prompt length is drawn uniformly per text from `np.random.default_rng(seed)` (capped so
    the response keeps at least one token). A length whose prefix does not re-encode to the same
    ids (a cut inside a BPE word) is replaced by the nearest one that does, so that
    `encode(prompt) + encode(response) == encode(text)` and `prompt + response == text`.

    Args:
        texts: N texts, each at least `min_tokens + 1` tokens long.
        tokenizer: a `tokenizers.Tokenizer`, or any object whose `encode(text)` gives ids (or an
            Encoding) and whose `decode(ids)` gives text.
        seed: seed of the prompt lengths (`np.random.default_rng` accepts ints and int lists).
        min_tokens, max_tokens: the range of prompt lengths (inclusive).

    Returns:
        N (prompt, response) pairs of strings.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    draws = np.random.default_rng(seed).integers(min_tokens, max_tokens + 1, size=len(texts))
    all_ids = _ids_batch(tokenizer, texts)
    cuts = []
    for i, (text, ids) in enumerate(zip(texts, all_ids, strict=True)):
        if len(ids) <= min_tokens:
            raise ValueError(f"text {i} has {len(ids)} tokens, need > {min_tokens}: {text!r}")
        cuts.append(min(int(draws[i]), max_tokens, len(ids) - 1))
    # Fast path, batched: decode both halves and re-encode them.
    prompts = _decode_batch(tokenizer, [ids[:n] for ids, n in zip(all_ids, cuts, strict=True)])
    responses = _decode_batch(tokenizer, [ids[n:] for ids, n in zip(all_ids, cuts, strict=True)])
    prompt_ids, response_ids = _ids_batch(tokenizer, prompts), _ids_batch(tokenizer, responses)
    pairs = []
    for i, (ids, n) in enumerate(zip(all_ids, cuts, strict=True)):
        if prompt_ids[i] == ids[:n] and response_ids[i] == ids[n:]:
            pairs.append((prompts[i], responses[i]))
            continue
        # Slow path (a cut inside a BPE word): the nearest length that re-encodes, shorter first.
        hi = min(max_tokens, len(ids) - 1)
        order = sorted(range(min_tokens, hi + 1), key=lambda k: (abs(k - n), k))
        pair = next((p for k in order if (p := _cut(tokenizer, ids, k)) is not None), None)
        if pair is None:
            raise ValueError(f"text {i} has no prefix of {min_tokens}-{hi} tokens that re-encodes")
        pairs.append(pair)
    return pairs


def make_prompts(
    texts: Sequence[str],
    tokenizer: Any,
    seed: int | Sequence[int],
    min_tokens: int = 2,
    max_tokens: int = 8,
) -> list[str]:
    """Prompts of `min_tokens`-`max_tokens` tokens cut from `texts` (see `split_prompts`)."""
    return [p for p, _ in split_prompts(texts, tokenizer, seed, min_tokens, max_tokens)]


# ---------------------------------------------------------------------------------------------
# Preparation and loading.


def _config(seed, n_train, n_test, vocab_size, min_prompt_tokens, max_prompt_tokens) -> dict:
    return {
        "name": DIRNAME,
        "version": VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "vocab_size": vocab_size,
        "min_prompt_tokens": min_prompt_tokens,
        "max_prompt_tokens": max_prompt_tokens,
    }


def _read_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if all((root / f).is_file() for f in _FILES) else None


def _matches(meta: dict | None, config: dict) -> bool:
    return meta is not None and all(meta.get(k) == v for k, v in config.items())


def _summary(x: np.ndarray) -> list[float]:
    """[min, 25%, 50%, 75%, max], rounded for meta.json."""
    return [round(float(q), 4) for q in np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])]


def _split_corpus(seed: int, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """Train: the first `n_train` reviews of the seed's stream; test: later ones not in train."""
    n = n_train + n_test
    texts = generate_corpus(seed, n)
    while True:
        train, seen = texts[:n_train], set(texts[:n_train])
        test = [t for t in texts[n_train:] if t not in seen][:n_test]
        if len(test) == n_test:
            return train, test
        n += n_test - len(test) + 16
        texts = generate_corpus(seed, n)  # the stream has the prefix property: train is unchanged


def _write_split(path: Path, texts: list[str], pairs: list, rewards: np.ndarray) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text, (prompt, response), reward in zip(texts, pairs, rewards, strict=True):
            reward = round(float(reward), 4)  # VADER's own rounding, without float32 digits
            record = {"text": text, "prompt": prompt, "response": response, "reward": reward}
            f.write(json.dumps(record) + "\n")


def _build(tmp: Path, config: dict) -> None:
    """Write the whole prepared layout into the fresh directory `tmp`."""
    train, test = _split_corpus(config["seed"], config["n_train"], config["n_test"])
    tokenizer = train_tokenizer(train, config["vocab_size"])
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "raw").mkdir()
    meta = dict(config, tokenizer_vocab_size=tokenizer.get_vocab_size(), eos_token=EOS_TOKEN)
    meta["eos_id"] = tokenizer.token_to_id(EOS_TOKEN)
    meta["reward_quartiles"], meta["token_length_quartiles"] = {}, {}
    for i, (split, texts) in enumerate((("train", train), ("test", test))):
        seed = [config["seed"], i]  # independent prompt lengths per split
        pairs = split_prompts(
            texts, tokenizer, seed, config["min_prompt_tokens"], config["max_prompt_tokens"]
        )
        rewards = ground_truth_reward(texts)
        _write_split(tmp / "raw" / f"{split}.jsonl", texts, pairs, rewards)
        lengths = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])
        meta["reward_quartiles"][split] = _summary(rewards)
        meta["token_length_quartiles"][split] = _summary(lengths)
        meta[f"token_length_mean_{split}"] = round(float(lengths.mean()), 2)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _install(tmp: Path, root: Path, config: dict) -> None:
    """Move the finished `tmp` to `root` by renames only, so `root` is never half-written."""
    if _matches(_read_meta(root), config):  # another process installed the same meanwhile
        return
    old = None
    if root.exists():  # stale or mismatched: move aside first (a dir cannot be renamed onto one)
        old = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.old-", dir=root.parent))
        os.replace(root, old / DIRNAME)
    try:
        os.rename(tmp, root)
    except OSError:  # another process installed it meanwhile: keep theirs if it is what we want
        if not _matches(_read_meta(root), config):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare(
    data_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_prompt_tokens: int = 2,
    max_prompt_tokens: int = 8,
    force: bool = False,
) -> Path:
    """Generate, tokenize, split and score the corpus under `{data_dir}/synthetic_reviews/`.

    Re-uses the directory when its meta.json matches these arguments (unless `force`). The
    layout is built in a temporary sibling directory and renamed into place, so a crash never
    leaves a half-prepared directory. About 17 s of CPU time at the defaults (VADER is half).

    Args:
        data_dir: parent directory of the prepared dataset.
        seed: corpus seed (the prompt lengths use `[seed, split index]`).
        n_train, n_test: number of reviews per split; test reviews never repeat a train review.
        vocab_size: BPE vocabulary size upper bound (EOS included).
        min_prompt_tokens, max_prompt_tokens: prompt-length range in tokens.
        force: rebuild even when a matching preparation exists.

    Returns:
        the prepared directory `{data_dir}/synthetic_reviews`.
    """
    _check_local(data_dir)
    config = _config(seed, n_train, n_test, vocab_size, min_prompt_tokens, max_prompt_tokens)
    root = Path(data_dir) / DIRNAME
    if not force and _matches(_read_meta(root), config):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the installed folder should not be
        _build(tmp, config)
        _install(tmp, root, config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_local(data_dir: str | os.PathLike) -> None:
    if "://" in os.fspath(data_dir):
        raise ValueError(
            f"--data-dir {data_dir}: the synthetic task is a per-host cache in a local folder "
            "(each host prepares its own copy in seconds); pass a local path"
        )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class SyntheticTask:
    """A prepared synthetic-reviews task: records, prompts, tokenizer file and reward function."""

    data_dir: Path  # the prepared `.../synthetic_reviews` directory
    tokenizer_path: Path  # tokenizer.json (byte-level BPE, EOS = "<|endoftext|>")
    meta: dict[str, Any]
    train: list[dict[str, Any]]  # {"text", "prompt", "response", "reward"}
    test: list[dict[str, Any]]
    train_prompts: list[str]
    test_prompts: list[str]  # prompts of held-out reviews, for evaluation
    reward_fn: Callable[[Sequence[str]], np.ndarray] = ground_truth_reward


def load_task(data_dir: str | os.PathLike) -> SyntheticTask:
    """Load a prepared task from `data_dir` (the parent given to `prepare`, or the folder)."""
    _check_local(data_dir)
    root = Path(data_dir)
    if not (root / "meta.json").is_file():
        root = root / DIRNAME
    meta = _read_meta(root)
    if meta is None:
        raise FileNotFoundError(
            f"no prepared synthetic reviews under {data_dir}: run "
            f"`python -m rlhf_jax.data.synthetic --data-dir {data_dir}`"
        )
    train, test = _read_jsonl(root / "raw/train.jsonl"), _read_jsonl(root / "raw/test.jsonl")
    return SyntheticTask(
        data_dir=root,
        tokenizer_path=root / "tokenizer.json",
        meta=meta,
        train=train,
        test=test,
        train_prompts=[r["prompt"] for r in train],
        test_prompts=[r["prompt"] for r in test],
    )


def main() -> None:
    """Command line: `python -m rlhf_jax.data.synthetic --data-dir DIR [--seed 0 ...]`."""
    import tyro

    root = tyro.cli(prepare, description=prepare.__doc__.splitlines()[0])
    meta = json.loads((root / "meta.json").read_text())
    print(f"prepared {root}")
    print(f"  train/test: {meta['n_train']}/{meta['n_test']} reviews")
    print(f"  tokenizer: {meta['tokenizer_vocab_size']} tokens, eos id {meta['eos_id']}")
    for split in ("train", "test"):
        print(f"  {split} reward [min, 25%, 50%, 75%, max]: {meta['reward_quartiles'][split]}")
        print(
            f"  {split} tokens [min, 25%, 50%, 75%, max]: {meta['token_length_quartiles'][split]}"
        )


if __name__ == "__main__":
    main()
