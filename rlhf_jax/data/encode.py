"""A `formats.Dataset` as token rows for the steps, with explicit truncation that is counted.

    rows, cut = encode_dataset(ds, tok, max_length=512, max_prompt_length=256, truncation="left")
    print(cut.report())   # "3 of 400 rows truncated (...): data.jsonl:17, ..."
    batch = data.collate_preferences(rows[:8], tok, max_length=512, max_prompt_length=256)

What each type becomes (lists of ids, unpadded; other columns kept beside them):
- language modeling: `tokens`, `loss_mask` (every token; conversational rows with
  `assistant_only` only the assistant turns, `chat.encode_chat_with_mask`);
- prompt-completion: `tokens` = prompt + completion, `loss_mask` on the completion (TRL's
  completion-only loss), `prompt_ids`, `completion_ids`;
- preference: `prompt_ids`, `chosen_ids`, `rejected_ids`;
- prompt-only: `prompt_ids`; unpaired preference: `prompt_ids`, `completion_ids`, `label`.

Text rows: the prompt (or the text) gets the tokenizer's BOS when its config says so
(`add_bos_token`, else what its post-processor adds), and a completion ends with EOS. Conversational
rows: the chat template writes every special token (none added), the prompt is rendered with the
generation prompt, and a completion is what the template adds after it, up to the end of its
turn (the whitespace after is not generated).

Truncation (`truncation`):
- "left": a prompt longer than `max_prompt_length` loses its start (the end, nearest the
  completion, is kept); a language-modeling row longer than `max_length` loses its start;
- "right": a prompt loses its end (a system prompt is kept); a row loses its end;
- "error": any row over either length is an error naming where it came from.
A completion that does not fit after its prompt always loses its end, and then has no EOS. Every
cut row is counted (`Truncation.report`): nothing is cut silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_jax.data import chat
from rlhf_jax.data.formats import Dataset

TRUNCATIONS = ("left", "right", "error")


@dataclasses.dataclass
class Truncation:
    """What `encode_dataset` cut: rows seen, rows truncated, and where the first few came from."""

    policy: str
    max_length: int
    max_prompt_length: int | None
    rows: int = 0
    truncated: int = 0
    texts_cut: int = 0
    prompts_cut: int = 0
    completions_cut: int = 0
    first: list[str] = dataclasses.field(default_factory=list)

    def count(
        self, where: str, *, text: bool = False, prompt: bool = False, completion: bool = False
    ) -> None:
        if text or prompt or completion:
            self.truncated += 1
            self.texts_cut += text
            self.prompts_cut += prompt
            self.completions_cut += completion
            if len(self.first) < 5:
                self.first.append(where)

    def report(self) -> str:
        """One line: how many rows were cut, which part, under which policy and where."""
        if not self.truncated:
            return f"{self.rows} rows, none truncated"
        side = "start" if self.policy == "left" else "end"
        parts = []
        if self.texts_cut:
            parts.append(f"{self.texts_cut} lost their {side} (> {self.max_length} tokens)")
        if self.prompts_cut:
            limit = self.max_prompt_length or self.max_length
            parts.append(f"{self.prompts_cut} prompts lost their {side} (> {limit} tokens)")
        if self.completions_cut:
            parts.append(f"{self.completions_cut} completions lost their end and EOS")
        more = ", ..." if self.truncated > len(self.first) else ""
        return (
            f"{self.truncated} of {self.rows} rows truncated ({'; '.join(parts)}; "
            f"--truncation {self.policy}): {', '.join(self.first)}{more}"
        )


def adds_bos(tokenizer: Any) -> bool:
    """Whether plain text gets the BOS token: the config's `add_bos_token`, else whether the
    tokenizer's post-processor puts it first."""
    if tokenizer.bos_id is None:
        return False
    flag = tokenizer.config.get("add_bos_token")
    if isinstance(flag, bool):
        return flag
    ids = tokenizer.backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tokenizer.bos_id


def _text_prompt(tokenizer: Any, text: str) -> list[int]:
    return ([tokenizer.bos_id] if adds_bos(tokenizer) else []) + tokenizer.encode(text)


def _chat_completion(tokenizer: Any, prompt: list, completion: list) -> tuple[list, list]:
    """(prompt ids, completion ids) of a conversational pair: the prompt rendered with the
    generation prompt, the completion what the template adds after it, to its turn's end."""
    before = chat.render_chat(tokenizer, prompt, add_generation_prompt=True)
    full = chat.render_chat(tokenizer, [*prompt, *completion])
    if not full.startswith(before):
        raise chat.TemplateError(
            "the chat template renders the prompt with its generation prompt as something other "
            "than the start of prompt + completion"
        )
    end = max(len(full.rstrip()), len(before))
    encoding = tokenizer.backend.encode(full[:end], add_special_tokens=False)
    split = sum(1 for start, _ in encoding.offsets if start < len(before))
    return list(encoding.ids[:split]), list(encoding.ids[split:])


def _pair(tokenizer: Any, prompt: Any, completion: Any, conversational: bool) -> tuple[list, list]:
    if conversational:
        return _chat_completion(tokenizer, prompt, completion)
    return _text_prompt(tokenizer, prompt), tokenizer.encode(completion) + [tokenizer.eos_id]


def _prompt(tokenizer: Any, prompt: Any, conversational: bool) -> list[int]:
    if conversational:
        return chat.encode_chat(tokenizer, prompt, add_generation_prompt=True)
    return _text_prompt(tokenizer, prompt)


class _Cutter:
    """Applies one truncation policy and counts what it cut."""

    def __init__(self, cut: Truncation):
        self.cut = cut

    def _over(self, where: str, what: str, n: int, limit: int, flag: str) -> None:
        if self.cut.policy == "error":
            raise ValueError(
                f"{where}: the {what} has {n} tokens, more than {flag} {limit}; raise it, or pass "
                "--truncation left/right to cut (counted and reported)"
            )

    def prompt(self, ids: list[int], where: str) -> tuple[list[int], bool]:
        limit = self.cut.max_prompt_length or self.cut.max_length
        if len(ids) <= limit:
            return ids, False
        flag = "--max-prompt-length" if self.cut.max_prompt_length else "--max-length"
        self._over(where, "prompt", len(ids), limit, flag)
        return (ids[-limit:] if self.cut.policy == "left" else ids[:limit]), True

    def completion(self, prompt: list[int], ids: list[int], where: str) -> tuple[list[int], bool]:
        room = self.cut.max_length - len(prompt)
        if len(ids) <= room:
            return ids, False
        self._over(where, "prompt + completion", len(prompt) + len(ids), self.cut.max_length,
                   "--max-length")  # fmt: skip
        return ids[:room], True


def encode_dataset(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "left",
    assistant_only: bool = False,
) -> tuple[list[dict[str, Any]], Truncation]:
    """Token rows of every row of `dataset` (see the module docstring) and what was truncated.

    Raises:
      ValueError: an unknown `truncation`, a prompt budget that leaves no room for a completion,
        a row over budget with "error" (naming where it came from), `assistant_only` on data that
        is not conversational language modeling, or a chat template error (naming the row).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r}: must be one of {', '.join(TRUNCATIONS)}")
    if max_prompt_length is not None and not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}"
        )
    if assistant_only and not (dataset.conversational and dataset.kind == "language_modeling"):
        raise ValueError(
            "assistant-only loss needs conversational language-modeling data (a 'messages' "
            f"column); {dataset.source} is {dataset.kind.replace('_', '-')} "
            f"({'conversational' if dataset.conversational else 'text'})"
        )
    cut = Truncation(truncation, max_length, max_prompt_length)
    cutter, out = _Cutter(cut), []
    for row, where in zip(dataset.rows, dataset.where):
        try:
            out.append(_encode_row(dataset, tokenizer, row, where, cutter, assistant_only))
        except chat.TemplateError as e:
            raise chat.TemplateError(f"{where}: {e}") from None
        cut.rows += 1
    return out, cut


def _encode_row(ds: Dataset, tok: Any, row: dict, where: str, cutter: _Cutter, assistant_only):
    kind, conv = ds.kind, ds.conversational
    extra = {k: v for k, v in row.items() if k not in ("text", "messages", "prompt", "completion",
                                                     "chosen", "rejected")}  # fmt: skip
    if kind == "language_modeling":
        if conv and assistant_only:
            ids, mask = chat.encode_chat_with_mask(tok, row["messages"])
        else:
            ids = chat.encode_chat(tok, row["messages"]) if conv else (
                _text_prompt(tok, row["text"]) + [tok.eos_id]
            )  # fmt: skip
            mask = [1] * len(ids)
        limit = cutter.cut.max_length
        if len(ids) > limit:
            cutter._over(where, "row", len(ids), limit, "--max-length")
            keep = slice(-limit, None) if cutter.cut.policy == "left" else slice(0, limit)
            ids, mask = ids[keep], mask[keep]
            cutter.cut.count(where, text=True)
        return {**extra, "tokens": ids, "loss_mask": mask}
    if kind == "prompt_only":
        ids, cut_p = cutter.prompt(_prompt(tok, row["prompt"], conv), where)
        cutter.cut.count(where, prompt=cut_p)
        return {**extra, "prompt": row["prompt"], "prompt_ids": ids}
    if kind == "preference":
        p, chosen = _pair(tok, row["prompt"], row["chosen"], conv)
        p2, rejected = _pair(tok, row["prompt"], row["rejected"], conv)
        if p2 != p:
            raise chat.TemplateError("the prompt tokenizes differently before chosen and rejected")
        p, cut_p = cutter.prompt(p, where)
        chosen, cut_c = cutter.completion(p, chosen, where)
        rejected, cut_r = cutter.completion(p, rejected, where)
        cutter.cut.count(where, prompt=cut_p, completion=cut_c or cut_r)
        return {**extra, "prompt_ids": p, "chosen_ids": chosen, "rejected_ids": rejected}
    p, completion = _pair(tok, row["prompt"], row["completion"], conv)
    p, cut_p = cutter.prompt(p, where)
    completion, cut_c = cutter.completion(p, completion, where)
    cutter.cut.count(where, prompt=cut_p, completion=cut_c)
    out = {**extra, "prompt": row["prompt"], "prompt_ids": p, "completion_ids": completion}
    if kind == "prompt_completion":
        out["tokens"] = p + completion
        out["loss_mask"] = [0] * len(p) + [1] * len(completion)
    return out


# ----------------------------------------------------------------------------------------------
# Encoded rows in the collators of `data.tokenization` (they batch these rows as they are).


def token_rows(records: Sequence[Any]) -> list[tuple[list, list]] | None:
    """(tokens, loss_mask) of each encoded LM / prompt-completion row; None unless every record is
    one (then they are text records)."""
    if not records or not all(isinstance(r, Mapping) and "tokens" in r for r in records):
        return None
    return [(list(r["tokens"]), list(r["loss_mask"])) for r in records]


def pair_rows(records: Sequence[Any]) -> list[tuple[tuple, tuple]] | None:
    """((tokens, loss_mask) of prompt + chosen, of prompt + rejected) of each encoded preference
    row; None unless every record is one (then they are text records)."""
    if not records or not all(isinstance(r, Mapping) and "chosen_ids" in r for r in records):
        return None
    out = []
    for r in records:
        p = list(r["prompt_ids"])
        c, j = list(r["chosen_ids"]), list(r["rejected_ids"])
        out.append(((p + c, [0] * len(p) + [1] * len(c)), (p + j, [0] * len(p) + [1] * len(j))))
    return out
