"""Chat templates (`data.chat`) against `transformers`: token ids equal `apply_chat_template`, and
the assistant-only mask equals the one `transformers` computes from `{% generation %}` markers,
on three templates written here: ChatML (Qwen), a Llama-3-style one (BOS in the template, headers,
trimmed content) and a Gemma-style one (system folded into the first user turn, role "model",
alternation enforced with `raise_exception`). Each tokenizer is a byte-level BPE trained here with
the template's special tokens (tests/helpers/user_model.py)."""

import json

import pytest
import transformers
from helpers import user_model

from rlhf_jax import data
from rlhf_jax.data import chat

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}"
    "{{ (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# ChatML as templates are usually written: over several lines, indented, so that the block
# trimming of the environment (`trim_blocks`, `lstrip_blocks`) decides the text.
CHATML_LINES = (
    "{% for message in messages %}\n"
    "    {% if message['role'] == 'assistant' %}\n"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}\n"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}\n"
    "{% endfor %}\n"
    "  {% if add_generation_prompt %}\n"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}\n"
)
# template -> (its special tokens, the tokenizer's special-token fields)
TEMPLATES = {
    "chatml": (CHATML, user_model.SPECIAL, {}),
    "chatml_lines": (CHATML_LINES, user_model.SPECIAL, {}),
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<pad>"},
    ),
    "gemma": (
        GEMMA,
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    ),
}
CONVERSATION = [
    {"role": "system", "content": "You count apples."},
    {"role": "user", "content": "Tom has 3 apples and gets 4 more. How many?"},
    {"role": "assistant", "content": "He has 7 apples."},
    {"role": "user", "content": "  And with 2 more?  "},
    {"role": "assistant", "content": "Then 9, ünïcode ✓."},
]


@pytest.fixture(scope="module", params=list(TEMPLATES))
def tokenizers_pair(request, tmp_path_factory):
    """(ours, transformers') for one template, read from the folder transformers saved."""
    template, special, tokens = TEMPLATES[request.param]
    backend = user_model.train_tokenizer(user_model.corpus(), special=special)
    hf = user_model.hf_tokenizer(backend, chat_template=template, **tokens)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(str(folder))
    return data.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def _hf_ids(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


@pytest.mark.parametrize("cut", [2, 3, 5])
def test_token_ids_equal_apply_chat_template(tokenizers_pair, cut):
    ours, hf = tokenizers_pair
    messages = CONVERSATION[:cut]
    for add in (False, True):
        assert chat.encode_chat(ours, messages, add_generation_prompt=add) == _hf_ids(
            hf, messages, add_generation_prompt=add
        )
    assert chat.render_chat(ours, messages) == hf.apply_chat_template(messages, tokenize=False)


def test_the_assistant_mask_equals_transformers_generation_markers(tokenizers_pair):
    ours, hf = tokenizers_pair
    want = hf.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = chat.encode_chat_with_mask(ours, CONVERSATION)
    assert ids == want["input_ids"]
    assert mask == want["assistant_masks"]
    assert 0 < sum(mask) < len(mask)
    decoded = ours.decode([i for i, m in zip(ids, mask) if m])
    assert "He has 7 apples." in decoded and "Then 9, ünïcode ✓." in decoded
    assert "How many" not in decoded and "count apples" not in decoded


def test_tojson_writes_json_unescaped():
    """As transformers' filter: not Jinja's, which escapes <, > and & for HTML."""
    value = {"tool": "<b> & 'x'", "ü": [1, None]}
    assert chat.render("{{ v | tojson }}", [], v=value) == json.dumps(value, ensure_ascii=False)
    assert chat.render("{{ v | tojson(indent=2) }}", [], v=value) == json.dumps(
        value, ensure_ascii=False, indent=2
    )


def test_template_errors_are_one_line(tokenizers_pair):
    ours, _ = tokenizers_pair
    if ours.chat_template == GEMMA:
        with pytest.raises(chat.TemplateError, match="roles must alternate"):
            chat.encode_chat(ours, [CONVERSATION[1], CONVERSATION[1]])
    with pytest.raises(chat.TemplateError, match="does not parse"):
        chat.render("{% for m in messages %}", CONVERSATION)


def test_a_template_that_rewrites_earlier_turns_is_refused_for_the_mask(tokenizers_pair):
    ours, _ = tokenizers_pair
    # Earlier assistant turns are shortened (as templates that drop past reasoning do).
    rewriting = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ m['content'][:3] }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    ours.chat_template, saved = rewriting, ours.chat_template
    try:
        with pytest.raises(chat.TemplateError, match=r"messages\[:3\] as something other"):
            chat.encode_chat_with_mask(ours, CONVERSATION)
    finally:
        ours.chat_template = saved


def test_without_a_template_and_bad_messages(tmp_path):
    hf = user_model.hf_tokenizer(chat_template=None)
    hf.save_pretrained(str(tmp_path))
    ours = data.load_tokenizer(tmp_path)
    with pytest.raises(
        chat.TemplateError,
        match="conversational rows need a chat template, and the tokenizer has none",
    ):
        chat.encode_chat(ours, CONVERSATION)
    with pytest.raises(ValueError, match=r"row 3 messages\[1\]: expected a \{role, content\}"):
        chat.check_messages([CONVERSATION[0], {"content": "x"}], "row 3 messages")
    with pytest.raises(ValueError, match="expected a non-empty list"):
        chat.check_messages("hello")
    with pytest.raises(ValueError, match=r"\[0\]: content must be text"):
        chat.check_messages([{"role": "user", "content": 3}])
