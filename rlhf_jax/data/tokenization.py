"""Tokenizers (Hugging Face `tokenizers`) and tokenization of records to static-shape batches.

Layout of a training row (contracts.md), RIGHT-padded to length T:

    [prompt tokens][response tokens][EOS][pad ...]
    attention_mask: 1 on prompt, response and EOS; 0 on padding
    loss_mask:      1 on response tokens and the EOS after them; 0 on prompt and padding

Truncation rules:
- the prompt keeps its END when it has more than `max_prompt_length` tokens (the tokens next to
  the response matter most);
- the response is cut to the `max_length - len(prompt)` positions left. A response that does not fit
  together with its EOS gets NO EOS: it did not end, and the model must not learn to stop there;
- prompts for generation are LEFT-padded (`prompt_tokens`, `prompt_mask`), also keeping their end.

Collation pads a batch to the smallest length bucket that holds its longest row (`DEFAULT_BUCKETS`
below, never above `max_length`), so a run compiles a handful of shapes at most; pass
`buckets=None` to always pad to `max_length` (one shape). All arrays are numpy int32.

Each text is tokenized on its own without the tokenizer's post-processor (no BOS/EOS added by the
tokenizer); the EOS above is appended here. `load_tokenizer` and `Tokenizer.save` take local
paths or cloud URLs such as gs:// (`rlhf_jax.paths`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from rlhf_jax import paths
from rlhf_jax.data import encode, tokenizer_files

__all__ = [
    "DEFAULT_BUCKETS",
    "EOS_CANDIDATES",
    "PAD_CANDIDATES",
    "Tokenizer",
    "bucket_length",
    "collate_demonstrations",
    "collate_preferences",
    "collate_prompts",
    "load_tokenizer",
    "tokenize_demonstration",
    "tokenize_preference",
    "tokenize_prompts",
]

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")  # looked up in this order
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")  # else the EOS doubles as padding
# GPT-2-style BPE file pairs: (vocab, merges); the second names are those of OpenAI's release.
_BPE_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template the pipeline needs.

    Args:
      backend: the Hugging Face tokenizer.
      eos_token: the end-of-sequence token; default: the first of `EOS_CANDIDATES` in the vocab.
      pad_token: the padding token; default: the first of `PAD_CANDIDATES` in the vocab, else EOS
        (the documented fallback: padding is masked everywhere, so any id serves).
      bos_token: the beginning-of-sequence token, or None (no BOS).
      chat_template: the Jinja chat template, or None.
      config: the other fields of the `tokenizer_config.json` it was read with (written back by
        `save`).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.backend = backend
        self.eos_token = eos_token or _first_in_vocab(backend, EOS_CANDIDATES)
        if self.eos_token is None:
            raise ValueError(
                f"the tokenizer has none of {EOS_CANDIDATES}; pass eos_token= naming its "
                "end-of-sequence token"
            )
        self.pad_token = pad_token or _first_in_vocab(backend, PAD_CANDIDATES) or self.eos_token
        self.bos_token = bos_token
        self.eos_id = self._token_id(self.eos_token, "eos_token")
        self.pad_id = self._token_id(self.pad_token, "pad_token")
        self.bos_id = None if bos_token is None else self._token_id(bos_token, "bos_token")
        self.chat_template = chat_template
        self.config = dict(config or {})

    def _token_id(self, token: str, what: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included (the embedding needs at least this
        many rows)."""
        ids = self.backend.get_vocab(with_added_tokens=True).values()
        return max(ids, default=-1) + 1

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, numpy or jax array; special tokens dropped unless asked)."""
        return self.backend.decode(_int_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs: Any, *, skip_special_tokens: bool = True) -> list[str]:
        """`decode` for many sequences at once (a 2-D array or a list of id lists)."""
        return self.backend.decode_batch(
            [_int_list(s) for s in seqs], skip_special_tokens=skip_special_tokens
        )

    def save(self, path: str | os.PathLike) -> str:
        """Writes `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template) and
        `special_tokens_map.json` into the folder `path` (local or cloud, each atomically), as
        `transformers.AutoTokenizer.from_pretrained(path)` reads them; returns tokenizer.json's
        path."""
        tokenizer_files.write_files(path, self)
        return os.fspath(paths.as_path(path) / "tokenizer.json")

    def same_as(self, other: Tokenizer) -> bool:
        """True when both map every token to the same id and share EOS and padding: token ids of
        one are the other's."""
        return self.backend.get_vocab(with_added_tokens=True) == other.backend.get_vocab(
            with_added_tokens=True
        ) and (self.eos_id, self.pad_id) == (other.eos_id, other.pad_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id}, "
            f"pad={self.pad_token!r}:{self.pad_id}, bos={self.bos_token!r}:{self.bos_id}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )


def _int_list(ids: Any) -> list[int]:
    return [int(i) for i in np.asarray(ids).reshape(-1)]


def _first_in_vocab(backend: tokenizers.Tokenizer, candidates: Sequence[str]) -> str | None:
    return next((t for t in candidates if backend.token_to_id(t) is not None), None)


def _byte_level_bpe(vocab_file: str, merges_file: str) -> tokenizers.Tokenizer:
    """GPT-2's tokenizer from its vocab/merges pair: byte-level BPE, no prefix space."""
    backend = tokenizers.Tokenizer(models.BPE.from_file(vocab_file, merges_file))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    specials = [t for t in EOS_CANDIDATES + PAD_CANDIDATES if t in vocab]
    # Special tokens match as whole strings before BPE, as in GPT-2's own tokenizer.
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in specials])
    return backend


def load_tokenizer(
    path: str | os.PathLike, *, eos_token: str | None = None, pad_token: str | None = None
) -> Tokenizer:
    """Loads a tokenizer from a `tokenizer.json` or from a GPT-2-style BPE file pair, with the
    special tokens and chat template of the folder's `tokenizer_config.json` when it has one
    (`data.tokenizer_files`: a Hugging Face model folder brings its own).

    Args:
      path: a `tokenizer.json` file; or a folder holding `tokenizer.json`, or `vocab.json` +
        `merges.txt`, or `encoder.json` + `vocab.bpe` (OpenAI's names for the same pair); or the
        vocab file of such a pair.
      eos_token: the end-of-sequence token; default: the folder config's, else the first of
        `EOS_CANDIDATES` present.
      pad_token: the padding token; default: the folder config's, else the first of
        `PAD_CANDIDATES` present, else EOS.

    Returns:
      A `Tokenizer`.
    """
    if paths.is_cloud(path):  # the tokenizers library reads local files: temporary copies
        return _load_cloud_tokenizer(path, eos_token=eos_token, pad_token=pad_token)
    path = os.fspath(path)
    if os.path.isfile(path):
        name, folder = os.path.basename(path), os.path.dirname(path)
        pair = next((p for p in _BPE_FILE_PAIRS if p[0] == name), None)
        if pair is None:
            backend = tokenizers.Tokenizer.from_file(path)
        else:
            backend = _byte_level_bpe(path, os.path.join(folder, pair[1]))
    elif os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            backend = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        else:
            pair = next(
                (
                    p
                    for p in _BPE_FILE_PAIRS
                    if all(os.path.isfile(os.path.join(path, f)) for f in p)
                ),
                None,
            )
            if pair is None:
                raise FileNotFoundError(
                    f"{path} holds no tokenizer.json and no vocab.json + merges.txt or "
                    "encoder.json + vocab.bpe pair"
                )
            backend = _byte_level_bpe(*(os.path.join(path, f) for f in pair))
    else:
        raise FileNotFoundError(f"no tokenizer file or folder at {path}")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = tokenizer_files.read_config(folder)
    token = tokenizer_files.token_string
    return Tokenizer(
        backend,
        eos_token=eos_token or token(config.get("eos_token")),
        pad_token=pad_token or token(config.get("pad_token")),
        bos_token=token(config.get("bos_token")),
        chat_template=tokenizer_files.read_chat_template(folder, config),
        config={k: v for k, v in config.items() if k not in tokenizer_files.SPECIAL_TOKENS},
    )


def _load_cloud_tokenizer(path: str | os.PathLike, **tokens: Any) -> Tokenizer:
    """`load_tokenizer` of a cloud file or folder: only its tokenizer files, copied locally."""
    src = paths.as_path(path)
    if src.is_file():
        folder, local_name = src.parent, src.name
        names = next((p for p in _BPE_FILE_PAIRS if src.name == p[0]), (src.name,))
    else:
        folder, local_name = src, ""
        names = (*tokenizer_files.FILES, *(name for pair in _BPE_FILE_PAIRS for name in pair))
    with tempfile.TemporaryDirectory(prefix="rlhf_jax_tokenizer_") as tmp:
        for name in names:
            if (folder / name).is_file():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write((folder / name).read_bytes())
        return load_tokenizer(os.path.join(tmp, local_name), **tokens)


# ----------------------------------------------------------------------------------------------
# Rows: unpadded ids and masks.


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}; "
            "leave room for at least one response token"
        )


def _prompt_ids(tokenizer: Tokenizer, prompt: str, max_prompt_length: int) -> list[int]:
    ids = tokenizer.encode(prompt)
    return ids[-max_prompt_length:]  # keep the end of a long prompt


def response_row(
    prompt_ids: list[int], response_ids: list[int], eos_id: int, max_length: int
) -> tuple[list[int], list[int]]:
    """(tokens, loss_mask) of one unpadded row; the response gets EOS only if it fits whole."""
    room = max_length - len(prompt_ids)
    if len(response_ids) + 1 <= room:
        response = response_ids + [eos_id]
    else:
        response = response_ids[:room]  # truncated: it did not end, so no EOS
    return prompt_ids + response, [0] * len(prompt_ids) + [1] * len(response)


def _pad_right(rows: Sequence[list[int]], length: int, value: int) -> np.ndarray:
    out = np.full((len(rows), length), value, np.int32)  # [B, T]
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def _pad_left(rows: Sequence[list[int]], length: int, value: int) -> np.ndarray:
    out = np.full((len(rows), length), value, np.int32)  # [B, P]
    for b, row in enumerate(rows):
        if row:
            out[b, length - len(row) :] = row
    return out


def stack_rows(
    rows: Sequence[tuple[list[int], list[int]]], length: int, pad_id: int, prefix: str = ""
) -> dict[str, np.ndarray]:
    tokens = [r[0] for r in rows]
    return {
        f"{prefix}tokens": _pad_right(tokens, length, pad_id),
        f"{prefix}attention_mask": _pad_right([[1] * len(t) for t in tokens], length, 0),
        f"{prefix}loss_mask": _pad_right([r[1] for r in rows], length, 0),
    }


def bucket_length(longest: int, buckets: Sequence[int] | None, cap: int) -> int:
    """Smallest bucket >= `longest` among `buckets` below `cap`, else `cap` (also for None)."""
    if longest > cap:
        raise ValueError(f"a row of {longest} tokens exceeds the cap of {cap}")
    fitting = [b for b in (buckets or ()) if longest <= b < cap]
    return min(fitting) if fitting else cap


def tokenize_demonstration(
    tokenizer: Tokenizer,
    prompt: str,
    response: str,
    *,
    max_length: int,
    max_prompt_length: int,
) -> dict[str, np.ndarray]:
    """One demonstration as `{"tokens", "attention_mask", "loss_mask"}`, each int32 [T].

    Layout and truncation as in the module docstring; T = `max_length`.
    """
    _check_lengths(max_length, max_prompt_length)
    p = _prompt_ids(tokenizer, prompt, max_prompt_length)
    row = response_row(p, tokenizer.encode(response), tokenizer.eos_id, max_length)
    batch = stack_rows([row], max_length, tokenizer.pad_id)
    return {k: v[0] for k, v in batch.items()}


def tokenize_preference(
    tokenizer: Tokenizer,
    prompt: str,
    chosen: str,
    rejected: str,
    *,
    max_length: int,
    max_prompt_length: int,
) -> dict[str, np.ndarray]:
    """One comparison as `chosen_{tokens,attention_mask,loss_mask}` and `rejected_*`, int32 [T].

    Both rows share the same (possibly truncated) prompt tokens; T = `max_length`.
    """
    rows = _preference_rows([(prompt, chosen, rejected)], tokenizer, max_length, max_prompt_length)
    batch = _collate_preference_rows(rows, max_length, tokenizer.pad_id)
    return {k: v[0] for k, v in batch.items()}


def tokenize_prompts(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_prompt_length: int,
    buckets: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Prompts for generation: `{"prompt_tokens", "prompt_mask"}`, int32 [B, P], LEFT-padded.

    Long prompts keep their end. P = `max_prompt_length`, or with `buckets` the smallest bucket that
    holds the longest prompt.
    """
    rows = [_prompt_ids(tokenizer, p, max_prompt_length) for p in prompts]
    return _collate_prompt_rows(rows, tokenizer.pad_id, max_prompt_length, buckets)


def _collate_prompt_rows(
    rows: Sequence[list[int]], pad_id: int, max_prompt_length: int, buckets: Sequence[int] | None
) -> dict[str, np.ndarray]:
    length = bucket_length(max((len(r) for r in rows), default=0), buckets, max_prompt_length)
    return {
        "prompt_tokens": _pad_left(rows, length, pad_id),
        "prompt_mask": _pad_left([[1] * len(r) for r in rows], length, 0),
    }


# ----------------------------------------------------------------------------------------------
# Collation of records (dataclass records, or mappings such as TFDS examples whose text is bytes).


def text_field(element: Any, name: str) -> str:
    """The text of field `name` of a record (a mapping or an object; str or UTF-8 bytes)."""
    value = element[name] if isinstance(element, Mapping) else getattr(element, name)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"field {name!r} must be text (str or UTF-8 bytes), got {type(value)}")
    return value


def _preference_rows(
    triples: Sequence[tuple[str, str, str]],
    tokenizer: Tokenizer,
    max_length: int,
    max_prompt_length: int,
) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    _check_lengths(max_length, max_prompt_length)
    eos = tokenizer.eos_id
    prompts = tokenizer.encode_batch([t[0] for t in triples])
    chosen = tokenizer.encode_batch([t[1] for t in triples])
    rejected = tokenizer.encode_batch([t[2] for t in triples])
    rows = []
    for p, c, r in zip(prompts, chosen, rejected):
        p = p[-max_prompt_length:]  # keep the end of a long prompt
        rows.append((response_row(p, c, eos, max_length), response_row(p, r, eos, max_length)))
    return rows


def _collate_preference_rows(rows, length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        **stack_rows([r[0] for r in rows], length, pad_id, "chosen_"),
        **stack_rows([r[1] for r in rows], length, pad_id, "rejected_"),
    }


def collate_preferences(
    records: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
) -> dict[str, np.ndarray]:
    """A preference batch: `{chosen,rejected}_{tokens,attention_mask,loss_mask}`, int32 [B, T].

    `records` are `PreferenceRecord`s or mappings with prompt/chosen/rejected (str or UTF-8
    bytes), or the token rows of `data.encode_dataset` (prompt_ids/chosen_ids/rejected_ids). T
    is the bucket of the longest row over both sides. When every record is a mapping carrying
    `reference_chosen_logps` and `reference_rejected_logps`, they are added as float32 [B].
    """
    rows = encode.pair_rows(records)  # rows of `data.encode_dataset`: already token ids
    if rows is None:
        triples = [
            (text_field(r, "prompt"), text_field(r, "chosen"), text_field(r, "rejected"))
            for r in records
        ]
        rows = _preference_rows(triples, tokenizer, max_length, max_prompt_length)
    longest = max(len(side[0]) for row in rows for side in row)
    batch = _collate_preference_rows(
        rows, bucket_length(longest, buckets, max_length), tokenizer.pad_id
    )
    reference_keys = ("reference_chosen_logps", "reference_rejected_logps")
    if all(isinstance(r, Mapping) and all(k in r for k in reference_keys) for r in records):
        for key in reference_keys:
            batch[key] = np.asarray([float(r[key]) for r in records], np.float32)  # [B]
    return batch


def collate_demonstrations(
    records: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
) -> dict[str, np.ndarray]:
    """A demonstration batch: `{"tokens", "attention_mask", "loss_mask"}`, int32 [B, T].

    `records` are `DemonstrationRecord`s or mappings with prompt/response (str or UTF-8 bytes),
    or the token rows of `data.encode_dataset` (tokens/loss_mask).
    """
    _check_lengths(max_length, max_prompt_length)
    rows = encode.token_rows(records)
    if rows is None:
        prompts = tokenizer.encode_batch([text_field(r, "prompt") for r in records])
        responses = tokenizer.encode_batch([text_field(r, "response") for r in records])
        rows = [
            response_row(p[-max_prompt_length:], r, tokenizer.eos_id, max_length)
            for p, r in zip(prompts, responses)
        ]
    length = bucket_length(max(len(r[0]) for r in rows), buckets, max_length)
    return stack_rows(rows, length, tokenizer.pad_id)


def collate_prompts(
    records: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    max_prompt_length: int,
    buckets: Sequence[int] | None = DEFAULT_BUCKETS,
) -> dict[str, np.ndarray]:
    """A prompt batch: `{"prompt_tokens", "prompt_mask"}`, int32 [B, P], LEFT-padded.

    `records` are `PromptRecord`s, strings, or mappings with "prompt"; a mapping that carries
    "prompt_ids" (e.g. from `PrefixPromptSource`) is used as those ids, not re-tokenized.
    """
    rows = []
    for r in records:
        if isinstance(r, Mapping) and "prompt_ids" in r:
            ids = _int_list(r["prompt_ids"])
        else:
            ids = tokenizer.encode(r if isinstance(r, str) else text_field(r, "prompt"))
        rows.append(ids[-max_prompt_length:])  # keep the end of a long prompt
    return _collate_prompt_rows(rows, tokenizer.pad_id, max_prompt_length, buckets)
