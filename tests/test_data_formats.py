"""Dataset formats (`data.formats`, `data.encode`): TRL's documented example rows of each type,
standard and conversational, recognised from their columns and read alike from JSONL, Parquet and
a prepared TFDS dataset; implicit prompts split; conversational rows tokenized as
`transformers.apply_chat_template` does; BOS as the tokenizer config says; truncation counted;
every bad input one error naming file, line and field."""

import json

import numpy as np
import pytest
import transformers
from helpers import user_model

from rlhf_jax import data
from rlhf_jax.data import chat, encode, formats

SKY = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]
# TRL's documentation, "Dataset formats and types": one example row per type and format.
TRL_EXAMPLES = {
    ("language_modeling", False): {"text": "The sky is blue."},
    ("language_modeling", True): {"messages": SKY + BLUE},
    ("prompt_only", False): {"prompt": "The sky is"},
    ("prompt_only", True): {"prompt": SKY},
    ("prompt_completion", False): {"prompt": "The sky is", "completion": " blue."},
    ("prompt_completion", True): {"prompt": SKY, "completion": BLUE},
    ("preference", False): {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    ("preference", True): {"prompt": SKY, "chosen": BLUE, "rejected": GREEN},
    ("unpaired_preference", False): {"prompt": "The sky is", "completion": " blue.", "label": True},
    ("unpaired_preference", True): {"prompt": SKY, "completion": BLUE, "label": True},
}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


@pytest.mark.parametrize("kind,conversational", list(TRL_EXAMPLES), ids=str)
def test_trl_examples_are_recognised_from_jsonl_and_parquet(kind, conversational, tmp_path):
    row = TRL_EXAMPLES[kind, conversational]
    rows = [dict(row, id=i) for i in range(3)]
    for path in (_jsonl(tmp_path / "d.jsonl", rows), _parquet(tmp_path / "d.parquet", rows)):
        ds = formats.load_dataset(path)
        assert (ds.kind, ds.conversational, len(ds)) == (kind, conversational, 3)
        assert ds.rows[2] == dict(row, id=2)  # fields kept as written, other columns beside
        assert ds.where[1] in (f"{path}:2", f"{path} row 2")


def test_implicit_prompts_are_split_off():
    """Anthropic HH-style transcripts: the prompt ends before the whitespace of the reply."""
    hh_chosen = "\n\nHuman: What color is the sky?\n\nAssistant: It is blue."
    hh_rejected = "\n\nHuman: What color is the sky?\n\nAssistant: It is green."
    assert formats.split_implicit_prompt(hh_chosen, hh_rejected) == (
        "\n\nHuman: What color is the sky?\n\nAssistant: It is",
        " blue.",
        " green.",
    )
    assert formats.split_implicit_prompt("A: Sure", "A: Surely") == ("A:", " Sure", " Surely")
    assert formats.split_implicit_prompt("x", "y") == ("", "x", "y")
    assert formats.split_implicit_prompt(SKY + BLUE, SKY + GREEN) == (SKY, BLUE, GREEN)


def test_implicit_prompt_datasets(tmp_path):
    rows = [{"chosen": SKY + BLUE, "rejected": SKY + GREEN}]
    ds = formats.load_dataset(_jsonl(tmp_path / "c.jsonl", rows), kinds=("preference",))
    assert ds.rows[0]["prompt"] == SKY and ds.rows[0]["chosen"] == BLUE
    rows = [{"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}]
    ds = formats.load_dataset(_jsonl(tmp_path / "s.jsonl", rows))
    assert (ds.rows[0]["prompt"], ds.rows[0]["chosen"]) == ("Q: sky? A:", " blue")


def test_columns_are_renamed_to_trl_names(tmp_path):
    rows = [{"question": "2+2?", "answer": "4", "source": "gsm"}]
    path = _jsonl(tmp_path / "q.jsonl", rows)
    ds = formats.load_dataset(path, columns="prompt=question", kinds=("prompt_only",))
    assert ds.kind == "prompt_only" and ds.rows[0] == {"prompt": "2+2?", "answer": "4",
                                                       "source": "gsm"}  # fmt: skip
    both = formats.load_dataset(path, columns={"prompt": "question", "completion": "answer"})
    assert both.kind == "prompt_completion"


def test_a_prepared_tfds_dataset(tmp_path, monkeypatch):
    """The project's `local_preferences` builder prepared from a JSONL, read back by name."""
    manual = tmp_path / "manual"
    manual.mkdir()
    pairs = [{"prompt": f"{i}+1?", "chosen": f" {i + 1}", "rejected": " 0"} for i in range(4)]
    _jsonl(manual / "train.jsonl", pairs)
    data.prepare_dataset("local_preferences", tmp_path / "tfds", manual_dir=manual)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    ds = formats.load_dataset("tfds:local_preferences:train", kinds=("preference",))
    assert ds.kind == "preference" and not ds.conversational and len(ds) == 4
    assert sorted(ds.rows, key=lambda r: r["prompt"]) == pairs  # text, not bytes
    with pytest.raises(ValueError, match="tfds:no_such_set: cannot open the prepared TFDS"):
        formats.load_dataset("tfds:no_such_set")


BAD = [
    ("missing.jsonl", None, {}, r"missing.jsonl: no such file"),
    ("d.csv", [{"text": "a"}], {}, r"d.csv: expected a .jsonl, .jsonl.gz or .parquet file"),
    ("d.jsonl", "[1]\n", {}, r"d.jsonl:1: expected a JSON object, got list"),
    ("d.jsonl", '{"text": "a"}\n{"text": \n', {}, r"d.jsonl:2: invalid JSON"),
    ("d.jsonl", [], {}, r"d.jsonl: no rows"),
    ("d.jsonl", [{"question": "a"}], {}, r"no TRL dataset type \(columns: question\).*--columns"),
    ("d.jsonl", [{"prompt": "a", "completion": "b"}], {"kinds": ("preference",)},
     r"a prompt-completion dataset .* this run needs preference data"),
    ("d.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}],
     {}, r"d.jsonl:2: no 'rejected' \(a preference dataset needs it\)"),
    ("d.jsonl", [{"prompt": SKY, "completion": BLUE}, {"prompt": "a", "completion": "b"}], {},
     r"d.jsonl:2: 'prompt': expected a non-empty list of \{role, content\} messages"),
    ("d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": SKY, "completion": "b"}], {},
     r"d.jsonl:2: 'prompt' is messages \(a conversational row\); every row"),
    ("d.jsonl", [{"prompt": "a", "chosen": "b"}], {},
     r"d.jsonl:1: no 'rejected' \(a preference dataset needs it\)"),
    ("d.jsonl", [{"prompt": "a", "completion": "b", "label": "yes"}], {},
     r"d.jsonl:1: 'label' must be true or false, got 'yes'"),
    ("d.jsonl", [{"prompt": "a"}], {"columns": "prompt=question"},
     r"d.jsonl:1: no column 'question' \(its columns: prompt\); fix --columns"),
    ("d.jsonl", [{"prompt": "a"}], {"columns": "question=prompt"},
     r"columns: question is not a TRL column name"),
    ("d.jsonl", [{"prompt": "a"}], {"columns": "prompt"}, r"columns: 'prompt' is not NAME=COLUMN"),
    ("d.jsonl", [{"chosen": "same", "rejected": "same"}], {},
     r"d.jsonl:1: 'chosen' and 'rejected' are the same"),
]  # fmt: skip


@pytest.mark.parametrize("name,rows,kwargs,message", BAD, ids=[b[-1][:30] for b in BAD])
def test_bad_datasets_are_one_error_naming_where(name, rows, kwargs, message, tmp_path):
    path = tmp_path / name
    if isinstance(rows, str):
        path.write_text(rows)
    elif rows is not None:
        _jsonl(path, rows)
    with pytest.raises(ValueError, match=message) as info:
        formats.load_dataset(path, **kwargs)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Encoding.


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """(ours, transformers') ChatML tokenizers without BOS (tests/helpers/user_model.py)."""
    folder = tmp_path_factory.mktemp("chatml")
    user_model.hf_tokenizer().save_pretrained(str(folder))
    return data.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def with_bos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bos")
    user_model.hf_tokenizer(bos_token="<|im_start|>", add_bos_token=True).save_pretrained(
        str(folder)
    )
    return data.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def _load(tmp_path, rows, **kwargs):
    return formats.load_dataset(_jsonl(tmp_path / "e.jsonl", rows), **kwargs)


def test_conversational_pairs_tokenize_as_apply_chat_template(chatml, tmp_path):
    ours, hf = chatml
    prompt = [{"role": "system", "content": "Be terse."}] + SKY
    rows = [{"prompt": prompt, "chosen": BLUE, "rejected": GREEN}]
    (row,), cut = encode.encode_dataset(_load(tmp_path, rows), ours, max_length=128)
    assert cut.truncated == 0 and cut.rows == 1
    want_prompt = hf.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    assert row["prompt_ids"] == want_prompt
    for side, completion in (("chosen", BLUE), ("rejected", GREEN)):
        full = hf.apply_chat_template(prompt + completion, return_dict=False)
        ids = row["prompt_ids"] + row[f"{side}_ids"]
        assert full[: len(ids)] == ids  # the template's own tokens, in its order
        assert hf.decode(full[len(ids) :]).strip() == ""  # only the newline after the turn
        assert hf.decode(row[f"{side}_ids"]) == completion[0]["content"] + "<|im_end|>"


def test_text_rows_get_bos_as_the_tokenizer_says_and_completions_eos(chatml, with_bos, tmp_path):
    rows = [{"prompt": "The sky is", "completion": " blue."}]
    for ours, hf in (chatml, with_bos):
        (row,), _ = encode.encode_dataset(_load(tmp_path, rows), ours, max_length=64)
        assert row["prompt_ids"] == hf("The sky is")["input_ids"]  # BOS only where HF adds it
        assert row["completion_ids"] == hf.encode(" blue.", add_special_tokens=False) + [
            ours.eos_id
        ]
        assert row["tokens"] == row["prompt_ids"] + row["completion_ids"]
        assert row["loss_mask"] == [0] * len(row["prompt_ids"]) + [1] * len(row["completion_ids"])
    assert encode.adds_bos(with_bos[0]) and not encode.adds_bos(chatml[0])


def test_assistant_only_language_modeling(chatml, tmp_path):
    ours, hf = chatml
    conversation = (
        SKY
        + BLUE
        + [{"role": "user", "content": "And at night?"}]
        + [{"role": "assistant", "content": "Black."}]
    )
    ds = _load(tmp_path, [{"messages": conversation}])
    (row,), _ = encode.encode_dataset(ds, ours, max_length=128, assistant_only=True)
    assert row["tokens"] == hf.apply_chat_template(conversation, return_dict=False)
    kept = [t for t, m in zip(row["tokens"], row["loss_mask"]) if m]
    trained = ours.backend.decode(kept, skip_special_tokens=False)
    assert trained == "It is blue.<|im_end|>Black.<|im_end|>"
    (every,), _ = encode.encode_dataset(ds, ours, max_length=128)
    assert every["tokens"] == row["tokens"] and all(every["loss_mask"])
    text = _load(tmp_path, [{"text": "abc"}])
    with pytest.raises(ValueError, match="assistant-only loss needs conversational"):
        encode.encode_dataset(text, ours, max_length=128, assistant_only=True)


def test_truncation_is_explicit_and_counted(chatml, tmp_path):
    ours, _ = chatml
    long_prompt = "the film was great " * 10
    rows = [
        {"prompt": long_prompt, "completion": " fine."},
        {"prompt": "a", "completion": " the plot " * 20},
        {"prompt": "a", "completion": " b"},
    ]
    ds = _load(tmp_path, rows)
    p_ids = ours.encode(long_prompt)
    left, cut = encode.encode_dataset(ds, ours, max_length=24, max_prompt_length=8)
    assert left[0]["prompt_ids"] == p_ids[-8:]  # the end kept
    assert (cut.rows, cut.truncated, cut.prompts_cut, cut.completions_cut) == (3, 2, 1, 1)
    assert len(left[1]["tokens"]) == 24 and ours.eos_id not in left[1]["completion_ids"]
    assert left[2]["completion_ids"][-1] == ours.eos_id
    assert cut.report().startswith("2 of 3 rows truncated (1 prompts lost their start (> 8 tok")
    assert f"{ds.where[0]}, {ds.where[1]}" in cut.report()
    right, _ = encode.encode_dataset(ds, ours, max_length=24, max_prompt_length=8,
                                     truncation="right")  # fmt: skip
    assert right[0]["prompt_ids"] == p_ids[:8]  # the start kept
    with pytest.raises(ValueError, match=r"e.jsonl:1: the prompt has \d+ tokens, more than "
                       r"--max-prompt-length 8"):  # fmt: skip
        encode.encode_dataset(ds, ours, max_length=24, max_prompt_length=8, truncation="error")
    lm = _load(tmp_path, [{"text": long_prompt}])
    (row,), cut = encode.encode_dataset(lm, ours, max_length=10, truncation="right")
    assert row["tokens"] == ours.encode(long_prompt)[:10] and cut.texts_cut == 1
    assert "1 lost their end (> 10 tokens)" in cut.report()
    assert encode.encode_dataset(ds, ours, max_length=512)[1].report() == "3 rows, none truncated"


def test_the_collators_batch_encoded_rows_as_the_text_path_does(chatml, tmp_path):
    ours, _ = chatml
    rows = [{"prompt": "a b", "chosen": " c", "rejected": " d e f"}]
    pairs, _ = encode.encode_dataset(_load(tmp_path, rows * 2), ours, max_length=16)
    lengths = dict(max_length=16, max_prompt_length=8, buckets=None)
    batch = data.collate_preferences(pairs, ours, **lengths)
    want = data.collate_preferences([data.PreferenceRecord(**r) for r in rows * 2], ours, **lengths)
    assert batch.keys() == want.keys()
    for k in batch:
        np.testing.assert_array_equal(batch[k], want[k], err_msg=k)
    lm, _ = encode.encode_dataset(_load(tmp_path, [{"text": "a b"}, {"text": "c"}]), ours,
                                  max_length=16)  # fmt: skip
    sft = data.collate_demonstrations(lm, ours, **lengths)
    c = ours.encode("c") + [ours.eos_id]
    assert sft["tokens"][1].tolist() == c + [ours.pad_id] * (16 - len(c))
    assert (
        sft["loss_mask"][1].tolist()
        == sft["attention_mask"][1].tolist()
        == [1] * len(c) + [0] * (16 - len(c))
    )
    prompts = data.collate_prompts(pairs, ours, max_prompt_length=6, buckets=None)
    n = len(pairs[0]["prompt_ids"])
    assert prompts["prompt_mask"][0].tolist() == [0] * (6 - n) + [1] * n
    assert prompts["prompt_tokens"][0, -n:].tolist() == pairs[0]["prompt_ids"]


def test_template_errors_name_the_row(chatml, tmp_path):
    ours, _ = chatml
    saved, ours.chat_template = ours.chat_template, "{{ raise_exception('no system') }}"
    try:
        with pytest.raises(chat.TemplateError, match=r"e.jsonl:1: the chat template raised: no"):
            encode.encode_dataset(_load(tmp_path, [{"messages": SKY}]), ours, max_length=8)
    finally:
        ours.chat_template = saved
