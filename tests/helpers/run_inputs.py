"""Inputs of the run/ and pairs tests: a word-level tokenizer over ten words (the conftest's
`word_tokenizer`), three preference pairs in those words, and a small run config dataclass."""

import dataclasses

import tokenizers

from rlhf_jax import data

WORDS = ["good", "bad", "great", "awful", "film", "plot", "the", "was", "a", "fine"]

PAIRS = [
    data.PreferenceRecord("the film", " was good", " was bad"),
    data.PreferenceRecord("a plot", " fine", " awful the plot"),
    data.PreferenceRecord("the", " great film", " bad"),
]


def make_tokenizer():
    """GPT-2-style byte-level words: "<|endoftext|>" (0, also EOS and unknown), then each word
    and its "Ġ"-prefixed (space-led) form."""
    vocab = {"<|endoftext|>": 0}
    for w in WORDS:
        vocab[w] = len(vocab)
        vocab["Ġ" + w] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return data.Tokenizer(backend)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A driver-like config: parse_config / write_run_config read any dataclass."""

    workdir: str = "w"
    steps: int = 10
    learning_rate: float = 1e-3
    betas: tuple[float, ...] = (0.1, 1.0)
    init_from: str | None = None
