"""Completion samples at every evaluation: the policy's completions of a few fixed held-out prompts,
written to `WORKDIR/samples.jsonl` (`{"step", "prompt", "completion", "length", "ended"}` rows) and
shown in TensorBoard's text tab / a W&B table (`--samples N`, default 4; 0 turns them off).

    cb = samples.CompletionSamples(samples.prompt_batch(records, tok, n=4, max_prompt_length=32),
                                   tok, max_new_tokens=32)
    stages.train_sft(..., callbacks=[cb])

The same prompts at every evaluation, decoded greedily by default (temperature 0), so successive
samples show what training changed. A sweep's stacked members are not sampled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import data as rdata
from rlhf_jax import distributed, sampling
from rlhf_jax.run.callbacks import Callback, Event


@dataclasses.dataclass(frozen=True)
class SampleFlags:
    """The completion-sample flags of the drivers whose stage trains a language model."""

    samples: int = 4  # held-out prompts completed at every evaluation (samples.jsonl; 0: none)
    sample_temperature: float = 0.0  # 0: greedy, the same prompts decoded alike each time


def _prompt_ids(record: Any) -> Any:
    """The prompt of one record for `data.collate_prompts`: encoded rows give their prompt ids
    (a token row's ids before its first trained token; a language-modeling row's first quarter),
    text records and strings pass as they are."""
    if not isinstance(record, Mapping):
        return record
    if "prompt_ids" in record:
        return {"prompt_ids": list(record["prompt_ids"])}
    if "tokens" in record:
        tokens, mask = list(record["tokens"]), list(record["loss_mask"])
        first = next((i for i, m in enumerate(mask) if m), len(tokens))
        if first == 0:  # every token trained: no prompt part
            first = max(1, len(tokens) // 4)
        return {"prompt_ids": tokens[:first]}
    return record


def prompt_batch(
    records: Sequence[Any], tokenizer: Any, *, n: int, max_prompt_length: int
) -> dict[str, np.ndarray]:
    """The first `n` prompts of `records` (encoded dataset rows, prompt records or strings) as a
    LEFT-padded `{"prompt_tokens", "prompt_mask"}` batch, each cut to its last
    `max_prompt_length` tokens (as the prompt loaders do)."""
    chosen = [_prompt_ids(r) for r in list(records)[:n]]
    if not chosen:
        raise ValueError("prompt_batch: no records to take sample prompts from")
    return rdata.collate_prompts(
        chosen, tokenizer, max_prompt_length=max_prompt_length, buckets=None
    )


class CompletionSamples(Callback):
    """At each evaluation, completes `prompts` with the policy and writes them as samples.

    Args:
      prompts: `{"prompt_tokens", "prompt_mask"}` [n, P], LEFT-padded (`prompt_batch`); the same
        on every process.
      tokenizer: decodes prompts and completions (special tokens dropped).
      max_new_tokens: completion length (P + max_new_tokens within the model's max_len).
      temperature: 0 is greedy; otherwise a draw with `seed` (the same key at every evaluation).
    """

    def __init__(
        self,
        prompts: Mapping[str, np.ndarray],
        tokenizer: Any,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
    ):
        self.tokens = np.asarray(prompts["prompt_tokens"], np.int32)
        self.mask = np.asarray(prompts["prompt_mask"], np.int32)
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self._compiled: dict[int, Any] = {}
        self.texts = [tokenizer.decode(t[m.astype(bool)]) for t, m in zip(self.tokens, self.mask)]

    def _generate(self, model: Any) -> Any:
        key = id(model)
        if key not in self._compiled:
            tok = self.tokenizer
            self._compiled[key] = jax.jit(
                lambda params, tokens, mask: sampling.generate(
                    model, params, tokens, mask, jax.random.key(self.seed),
                    max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    eos_id=tok.eos_id, pad_id=tok.pad_id,
                )
            )  # fmt: skip
        return self._compiled[key]

    def complete(self, model: Any, params: Any) -> list[dict[str, Any]]:
        """The sample rows of `params` (without the step): prompt, completion, its length in
        tokens, and whether it ended with EOS (else it ran to `max_new_tokens`)."""
        out = distributed.to_host(self._generate(model)(params, self.tokens, self.mask))
        rows = []
        for prompt, tokens, mask in zip(self.texts, out.tokens, out.mask):
            ids = tokens[mask.astype(bool)]
            ended = bool(len(ids)) and int(ids[-1]) == self.tokenizer.eos_id
            rows.append({
                "prompt": prompt,
                "completion": self.tokenizer.decode(ids),
                "length": len(ids),
                "ended": ended,
            })  # fmt: skip
        return rows

    def on_eval(self, event: Event) -> None:
        policy = event.policy()
        if policy is not None:
            event.writer.write_samples(event.step, self.complete(*policy))


def callbacks_for(
    config: Any,
    records: Sequence[Any],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    max_new_tokens: int,
) -> list[Any]:
    """A driver's sample callbacks: `[CompletionSamples]` of the first `config.samples` prompts of
    `records` (held-out ones where the driver has them), or [] when `config.samples` is 0."""
    n = getattr(config, "samples", 0)
    if not n or not records:
        return []
    batch = prompt_batch(records, tokenizer, n=n, max_prompt_length=max_prompt_length)
    return [
        CompletionSamples(
            batch, tokenizer, max_new_tokens=max_new_tokens,
            temperature=getattr(config, "sample_temperature", 0.0), seed=getattr(config, "seed", 0),
        )
    ]  # fmt: skip
