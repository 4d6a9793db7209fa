"""Chat templates: conversational rows rendered and tokenized as `transformers` does, and the
assistant turns found for an assistant-only loss.

    text = render(tok.chat_template, messages, add_generation_prompt=True, **special_tokens(tok))
    ids = encode_chat(tok, messages)                  # = AutoTokenizer.apply_chat_template
    ids, mask = encode_chat_with_mask(tok, messages)  # mask: 1 on the assistant turns' tokens

A template is a Jinja program over `messages` (a list of `{"role", "content"}` dicts),
`add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...). It is
rendered in a sandbox with blocks trimmed (`trim_blocks`, `lstrip_blocks`), loop controls, the
`raise_exception` and `strftime_now` functions and a `tojson` that does not escape HTML, the
environment the Hugging Face chat-template documentation specifies, so that the token ids equal
`apply_chat_template(messages, tokenize=True)` (tests/test_data_chat.py, on ChatML, Llama-3-style
and Gemma-style templates). The rendered text is tokenized without special tokens added: a
template writes its own BOS.

The assistant mask does not need `{% generation %}` markers (they are accepted and ignored): the
span of assistant turn i is what rendering `messages[: i + 1]` adds to rendering `messages[:i]`
with the generation prompt, without the whitespace after its last character (the turn ends with
its end-of-turn token; the newline after it is not generated). This needs a template whose
renderings of a conversation's prefixes are prefixes of its rendering; one that rewrites earlier
turns (e.g. drops their reasoning) is refused with an error saying so.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

Message = Mapping[str, Any]


class TemplateError(ValueError):
    """A chat template that cannot render a conversation (its own `raise_exception` included)."""


class _GenerationBlocks(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (Hugging Face's assistant markers): the body is
    rendered as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[Any]:
        next(parser.stream)  # the "generation" name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template does not parse: {e} (line {e.lineno})") from None


def special_tokens(tokenizer: Any) -> dict[str, str]:
    """The special tokens a template may write (`bos_token`, `eos_token`, `pad_token`, and the
    `unk_token` of the tokenizer's config), as strings."""
    out = {
        name: getattr(tokenizer, name)
        for name in ("bos_token", "eos_token", "pad_token")
        if getattr(tokenizer, name, None)
    }
    unk = getattr(tokenizer, "config", {}).get("unk_token")
    if isinstance(unk, dict):
        unk = unk.get("content")
    if isinstance(unk, str) and unk:
        out["unk_token"] = unk
    return out


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, Any]]:
    """`messages` as a list of dicts, each with a str "role" and a str (or None) "content".

    Raises:
      ValueError: naming `where` and the message at fault.
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"{where}[{i}]: expected a {{role, content}} message, got {m!r:.80}")
        if not (m.get("content") is None or isinstance(m.get("content"), str)):
            raise ValueError(f"{where}[{i}]: content must be text, got {type(m['content'])}")
        out.append(dict(m))
    return out


def render(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """The text of `messages` under the Jinja chat `template`; `variables` are the special tokens
    (`special_tokens(tokenizer)`) and anything else the template reads (e.g. `tools`).

    Raises:
      TemplateError: the template does not parse, or raised for this conversation.
    """
    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except TemplateError as e:  # the template's own raise_exception
        raise TemplateError(f"the chat template raised: {e}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed: {e}") from None


def _template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise TemplateError(
            "conversational rows need a chat template, and the tokenizer has none (add one to "
            "its tokenizer_config.json or chat_template.jinja, or give the data as text)"
        )
    return template


def render_chat(tokenizer: Any, messages: Sequence[Message], **kwargs: Any) -> str:
    """`render` with the tokenizer's chat template and special tokens."""
    return render(_template(tokenizer), messages, **special_tokens(tokenizer), **kwargs)


def encode_chat(
    tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of the rendered conversation (no special tokens added beyond the template's):
    `apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text)


def _render_or_empty(tokenizer: Any, messages: Sequence[Message]) -> str:
    """What comes before an assistant turn: the earlier messages with the generation prompt ("" for
    a first turn whose template cannot render an empty conversation)."""
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    except TemplateError:
        if messages:
            raise
        return ""


def assistant_spans(
    tokenizer: Any, messages: Sequence[Message]
) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the [start, end) character span of each assistant turn).

    Raises:
      TemplateError: the template renders a prefix of the conversation as something other than
        a prefix of the whole (the assistant turns cannot be located).
    """
    full = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render_or_empty(tokenizer, messages[:i])
        upto = render_chat(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                f"the chat template renders messages[:{i + 1}] as something other than a prefix "
                "of the whole conversation (it rewrites earlier turns), so assistant turns "
                "cannot be located; train on every token (no assistant-only loss)"
            )
        end = len(upto.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans


def encode_chat_with_mask(
    tokenizer: Any, messages: Sequence[Message]
) -> tuple[list[int], list[int]]:
    """(`encode_chat(tokenizer, messages)`, a 0/1 mask that is 1 on the tokens that start inside
    an assistant turn: the tokens an assistant-only loss trains on)."""
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in encoding.offsets]
    return list(encoding.ids), mask
