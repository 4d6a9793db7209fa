"""The tokenizer travels with the model (`data.load_tokenizer`, `data.tokenizer_files`): a folder
written by `transformers` reads with its special tokens and chat template, and what `save` writes
loads back in `transformers.AutoTokenizer` with the same tokens, ids and template.

The reference is `transformers` itself: the folder of tests/helpers/user_model.py (a byte-level
BPE with ChatML tokens, saved by `PreTrainedTokenizerFast.save_pretrained`)."""

import json

import pytest
import transformers
from helpers import user_model

from rlhf_jax import data
from rlhf_jax.data import tokenizer_files

TEXTS = ["the film was great", "Tom has 3 apples and gets 4 more. How many? 7", "ünïcode ✓"]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "How many apples?"},
    {"role": "assistant", "content": "7"},
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tokenizer folder as `transformers` saves it (no BOS, as Qwen2's)."""
    folder = tmp_path_factory.mktemp("hf_tok")
    user_model.hf_tokenizer().save_pretrained(str(folder))
    return folder


def _same_as_hf(ours: data.Tokenizer, hf) -> None:
    """Special tokens, their ids, the chat template and every encoding equal `hf`'s."""
    assert (ours.eos_token, ours.pad_token, ours.bos_token) == (
        hf.eos_token,
        hf.pad_token,
        hf.bos_token,
    )
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (
        hf.eos_token_id,
        hf.pad_token_id,
        hf.bos_token_id,
    )
    assert ours.chat_template == hf.chat_template
    assert ours.vocab_size == len(hf)
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


def test_a_transformers_folder_reads_with_its_special_tokens_and_template(hf_folder):
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    ours = data.load_tokenizer(hf_folder)
    assert ours.eos_token == "<|im_end|>" and ours.pad_token == "<|endoftext|>"  # not a guess
    _same_as_hf(ours, hf)


def test_save_writes_what_auto_tokenizer_reads_back_the_same(hf_folder, tmp_path):
    ours = data.load_tokenizer(hf_folder)
    ours.save(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    reread = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    _same_as_hf(ours, reread)
    original = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    assert reread.apply_chat_template(CHAT, tokenize=False) == original.apply_chat_template(
        CHAT, tokenize=False
    )
    again = data.load_tokenizer(tmp_path / "out")
    assert again.same_as(ours) and again.chat_template == ours.chat_template


def test_a_bos_token_round_trips(tmp_path):
    hf = user_model.hf_tokenizer(bos_token="<|im_start|>")  # any vocabulary token serves
    hf.save_pretrained(str(tmp_path / "in"))
    ours = data.load_tokenizer(tmp_path / "in")
    assert ours.bos_token == "<|im_start|>" and ours.bos_id == hf.bos_token_id
    ours.save(tmp_path / "out")
    _same_as_hf(ours, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")))


def test_the_written_forms_of_tokens_and_templates(hf_folder, tmp_path):
    """AddedToken dicts, special_tokens_map.json filling what the config leaves out, a list of
    named templates, and chat_template.jinja: each reads as the plain string."""
    folder = tmp_path / "forms"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((hf_folder / "tokenizer.json").read_text())
    config = {
        "eos_token": {"content": "<|im_end|>", "special": True, "lstrip": False},
        "chat_template": [
            {"name": "tool_use", "template": "{{ 'tools' }}"},
            {"name": "default", "template": user_model.CHATML},
        ],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    ours = data.load_tokenizer(folder)
    assert (ours.eos_token, ours.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert ours.chat_template == user_model.CHATML
    config["chat_template"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text("{{ 'jinja file' }}")
    assert data.load_tokenizer(folder).chat_template == "{{ 'jinja file' }}"
    assert tokenizer_files.token_string({"content": ""}) is None
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json: expected a JSON object"):
        data.load_tokenizer(folder)


def test_same_as_compares_ids_and_special_tokens(hf_folder, word_tokenizer):
    ours = data.load_tokenizer(hf_folder)
    assert ours.same_as(data.load_tokenizer(hf_folder))
    assert not ours.same_as(word_tokenizer)
    assert not ours.same_as(data.load_tokenizer(hf_folder, pad_token="<|im_start|>"))


def test_vocab_size_is_one_more_than_the_largest_id(hf_folder):
    ours = data.load_tokenizer(hf_folder)
    ids = ours.backend.get_vocab(with_added_tokens=True).values()
    assert ours.vocab_size == max(ids) + 1
    ours.backend.add_special_tokens(["<|new|>"])
    assert ours.vocab_size == max(ids) + 2
    import tokenizers

    gaps = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<eos>": 0, "a": 7}, unk_token="a"))
    assert data.Tokenizer(gaps, eos_token="<eos>").vocab_size == 8  # ids 1-6 unused: 8 rows
