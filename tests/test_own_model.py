"""The drivers on a researcher's own model folder (tests/helpers/user_model.py: a tiny Qwen2 with a
byte-level BPE tokenizer and a ChatML template, saved by `transformers`).

- The tokenizer travels with the model: `dpo.py --init-from FOLDER --pairs TEXT` tokenizes with
  the folder's tokenizer and exports it (it once used the offline task's, silently, for any model
  whose vocabulary held the task's 1207 ids).
- A complete export: `hf/` loads in `AutoTokenizer` (special tokens, ids, chat template equal the
  input folder's), `GenerationConfig` and `AutoModelForCausalLM` (logits equal ours, `generate`
  runs); the PEFT adapter names its base, and `AutoPeftModelForCausalLM` loads it from there.
- At the door, one line, exit 2, nothing written: a model trained on the offline task's ids with
  a foreign tokenizer (GRPO's arithmetic task once trained a BPE model through its character
  tokenizer), an unsupported `model_type`, a vocabulary without a row for every tokenizer id, a
  tokenizer whose special token is not in its vocabulary. The library path checks the
  vocabulary too, naming its arguments.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import drivers as driver_scripts

from rlhf_jax import data, models, sharding, stages
from rlhf_jax.data import encode
from rlhf_jax.run import cli, handover
from rlhf_jax.run.metrics_writer import SAMPLES_FILE, read_metrics

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "How many apples?"},
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("own_pairs") / "pairs.jsonl"
    rows = [
        {"prompt": f"Tom has {i} apples.", "chosen": f" He has {i}.", "rejected": " the film"}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SCHEDULE = ["--warmup-steps", "0", "--batch-size", "8", "--log-every", "1"]
HELPERS = Path(__file__).resolve().parent / "helpers"


@pytest.fixture(scope="module")
def dpo_pairs_run(user_model_folder, pairs_file, tmp_path_factory):
    """`dpo.py --init-from FOLDER --pairs FILE`: (workdir, rows)."""
    workdir = tmp_path_factory.mktemp("own_dpo") / "run"
    argv = [
        "--preset", "tiny", "--workdir", str(workdir), "--init-from", str(user_model_folder),
        "--pairs", str(pairs_file), "--steps", "3", "--checkpoint-every", "3", *SCHEDULE,
        "--loss", str(HELPERS / "gsm_rewards.py") + ":dpo_sigmoid_plus_one",
    ]  # fmt: skip
    rows = driver_scripts.load("dpo").main(argv)
    return workdir, rows


def test_dpo_on_text_pairs_trains_and_exports_the_models_own_tokenizer(
    user_model_folder, dpo_pairs_run
):
    workdir, rows = dpo_pairs_run
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(1 + np.log(2), rel=1e-5)  # --loss's, at the start
    config = json.loads((workdir / "run_config.json").read_text())
    assert config["loss"].endswith(":dpo_sigmoid_plus_one")
    hf = workdir / "hf"
    want = transformers.AutoTokenizer.from_pretrained(str(user_model_folder))
    got = transformers.AutoTokenizer.from_pretrained(str(hf))
    assert got.get_vocab() == want.get_vocab()  # the model's tokenizer, not the task's
    ours = data.load_tokenizer(hf)
    for text in ("Tom has 12 apples.", "ünïcode ✓\n\n x"):  # transformers reads it as we do
        assert got.encode(text, add_special_tokens=False) == ours.encode(text)
    assert {p.name for p in hf.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "generation_config.json",
    }  # fmt: skip
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(got, name) == getattr(want, name), name
        assert getattr(got, name + "_id") == getattr(want, name + "_id"), name
    assert got.chat_template == want.chat_template
    assert got.apply_chat_template(CHAT, add_generation_prompt=True) == want.apply_chat_template(
        CHAT, add_generation_prompt=True
    )
    generation = transformers.GenerationConfig.from_pretrained(str(hf))
    assert (generation.eos_token_id, generation.pad_token_id) == (
        want.eos_token_id,
        want.pad_token_id,
    )
    config = json.loads((hf / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (
        want.eos_token_id,
        want.pad_token_id,
    )


# ---------------------------------------------------------------------------------------------
# (a) multi-turn conversational SFT, assistant turns only; (b) DPO with LoRA on UltraFeedback-style
# conversational pairs (implicit prompt), from that SFT model; export and reload.


def _conversation(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "You count apples."},
        {"role": "user", "content": f"Tom has {i} apples and gets 2 more. How many?"},
        {"role": "assistant", "content": f"{i + 2} apples."},
        {"role": "user", "content": "And with one more?"},
        {"role": "assistant", "content": f"Then {i + 3}."},
    ]


@pytest.fixture(scope="module")
def sft_chat_run(user_model_folder, tmp_path_factory):
    """`sft.py --init-from FOLDER --dataset chats.jsonl --assistant-only-loss`: (workdir, rows,
    the token rows the driver built, the conversations)."""
    root = tmp_path_factory.mktemp("own_sft")
    chats = [_conversation(i) for i in range(16)]
    (root / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    built = []
    real = encode.encode_dataset

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        built.append(out[0])
        return out

    encode.encode_dataset = spy
    try:
        argv = [
            "--preset", "tiny", "--workdir", str(root / "run"), "--init-from",
            str(user_model_folder), "--dataset", str(root / "chats.jsonl"),
            "--assistant-only-loss", "--max-length", "96", "--steps", "4", "--learning-rate",
            "1e-2", "--checkpoint-every", "4", *SCHEDULE,
        ]  # fmt: skip
        rows = driver_scripts.load("sft").main(argv)
    finally:
        encode.encode_dataset = real
    return root / "run", rows, built[0], chats


def test_sft_on_conversations_trains_on_the_assistant_turns_only(user_model_folder, sft_chat_run):
    """(a): the driver's rows are `apply_chat_template`'s ids, and its loss mask is the
    assistant mask `transformers` computes from `{% generation %}` markers in the template."""
    from test_data_chat import CHATML as TAGGED

    _, rows, built, chats = sft_chat_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows)
    hf = transformers.AutoTokenizer.from_pretrained(str(user_model_folder))
    hf.chat_template = TAGGED  # the same text, with the assistant turns marked
    for row, conversation in zip(built, chats, strict=True):
        want = hf.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert row["tokens"] == want["input_ids"]
        assert row["loss_mask"] == want["assistant_masks"]
    # Completion samples at the last step: prompts are each row up to its first trained token
    # (the generation prompt after the system and user turns), cut to the last max_length // 2.
    samples = read_metrics(sft_chat_run[0], SAMPLES_FILE)
    assert [s["step"] for s in samples] == [4] * 4
    for sample, conversation in zip(samples, chats):
        ids = hf.apply_chat_template(
            conversation[:2], add_generation_prompt=True, return_dict=False
        )
        assert sample["prompt"] == hf.decode(ids[-48:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def dpo_chat_run(sft_chat_run, tmp_path_factory):
    """`dpo.py --init-from SFT --dataset prefs.jsonl --lora-rank 4`: UltraFeedback-style rows
    (chosen / rejected transcripts sharing their user turn, scores beside)."""
    root = tmp_path_factory.mktemp("own_dpo_chat")
    rows = []
    for i in range(16):
        user = _conversation(i)[1:2]
        rows.append({
            "chosen": user + [{"role": "assistant", "content": f"{i + 2} apples."}],
            "rejected": user + [{"role": "assistant", "content": "the film was dull."}],
            "score_chosen": 8.0, "score_rejected": 3.0,
        })  # fmt: skip
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--preset", "tiny", "--workdir", str(root / "run"), "--init-from", str(sft_chat_run[0]),
        "--dataset", str(root / "prefs.jsonl"), "--steps", "3", "--checkpoint-every", "3",
        "--lora-rank", "4", "--lora-alpha", "8", "--learning-rate", "1e-2", *SCHEDULE,
        "--max-prompt-length", "40", "--max-length", "64",  # the whole user turn: samples differ
    ]  # fmt: skip
    return root / "run", driver_scripts.load("dpo").main(argv)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_the_export_and_the_adapter_load_in_transformers_with_our_logits(
    user_model_folder, sft_chat_run, dpo_chat_run
):
    """(b): hf/ of the LoRA DPO run loads in transformers with our logits and the user's
    tokenizer; the adapter names the SFT model as its base and loads onto it from there."""
    from peft import AutoPeftModelForCausalLM

    workdir, rows = dpo_chat_run
    assert [r["step"] for r in rows] == [1, 2, 3]
    want = transformers.AutoTokenizer.from_pretrained(str(user_model_folder))
    got = transformers.AutoTokenizer.from_pretrained(str(workdir / "hf"))
    assert got.get_vocab() == want.get_vocab() and got.chat_template == want.chat_template
    tok = transformers.AutoTokenizer.from_pretrained(str(workdir / "hf"))
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(workdir / "hf")).eval()
    cfg, params = handover.load_init_params(workdir)
    ours = models.Transformer(cfg).apply({"params": params}, jax.numpy.asarray([ids]))[0]
    np.testing.assert_allclose(_hf_logits(merged, ids), np.asarray(ours), atol=2e-4, rtol=1e-4)
    out = merged.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(ids)  # generate runs with the exported generation config

    adapter = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(sft_chat_run[0] / "hf")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(workdir / "adapter")).eval()
    np.testing.assert_allclose(
        _hf_logits(peft_model, ids), _hf_logits(merged, ids), atol=2e-4, rtol=1e-4
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(str(sft_chat_run[0] / "hf")).eval()
    assert np.abs(_hf_logits(base, ids) - _hf_logits(merged, ids)).max() > 1e-4  # it trained

    # The completion samples of the last step (LoRA adapters on their base) are transformers'
    # greedy decoding of the exported model on the dataset's first prompts (implicit: the user
    # turn with the generation prompt, cut to the last --max-prompt-length tokens).
    run = json.loads((workdir / "run_config.json").read_text())
    P, N = run["max_prompt_length"], run["max_length"] - run["max_prompt_length"]
    samples = read_metrics(workdir, SAMPLES_FILE)
    assert [s["step"] for s in samples] == [3] * 4
    for i, sample in enumerate(samples):
        ids = tok.apply_chat_template(
            _conversation(i)[1:2], add_generation_prompt=True, return_dict=False
        )[-P:]
        assert sample["prompt"] == tok.decode(ids, skip_special_tokens=True)
        out = merged.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False)
        assert sample["completion"] == tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        assert sample["length"] == out.shape[1] - len(ids) or sample["ended"]


# ---------------------------------------------------------------------------------------------
# (c) GRPO on GSM8K-style rows with two weighted Python rewards that read the `answer` column.


def _recompute(prompts, completions, answers):
    """The two rewards written again here (not imported): format, exact match (None: no answer)."""
    fmt = [1.0 if re.match(r"\s*-?\d", c) else 0.0 for c in completions]
    exact = []
    for c, a in zip(completions, answers):
        found = re.search(r"-?\d+", c)
        exact.append(None if not a else float(bool(found) and found.group() == a.split("#### ")[1]))
    return fmt, exact


@pytest.fixture(scope="module")
def grpo_gsm_run(dpo_chat_run, tmp_path_factory):
    """`grpo.py --init-from DPO --dataset gsm.jsonl --reward-fn A B --reward-weights 0.5 1`: the
    last link of SFT -> DPO (LoRA) -> GRPO on the user's folder."""
    root = tmp_path_factory.mktemp("own_grpo")
    rows = [
        {"question": f"Tom has {i} apples and gets {i % 3} more. How many?",
         "answer": f"He has {i} + {i % 3}.\n#### {i + i % 3}" if i % 4 else ""}
        for i in range(16)
    ]  # fmt: skip
    (root / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--workdir", str(root / "run"), "--init-from", str(dpo_chat_run[0]), "--dataset",
        str(root / "gsm.jsonl"), "--columns", "prompt=question", "--reward-fn",
        str(HELPERS / "gsm_rewards.py") + ":format_ok", "gsm_rewards:exact_match",
        "--reward-weights", "0.5", "1.0", "--steps", "2", "--prompts-per-step", "8",
        "--group-size", "2", "--max-new-tokens", "6", "--max-prompt-length", "32",
        "--log-every", "1", "--checkpoint-every", "2", "--learning-rate", "1e-3",
    ]  # fmt: skip
    sys.path.insert(0, str(HELPERS))  # gsm_rewards:exact_match, as a module on the path
    try:
        out = driver_scripts.load("grpo").main(argv)
    finally:
        sys.path.remove(str(HELPERS))
    return root / "run", out, {r["question"]: r["answer"] for r in rows}


def test_grpo_logs_each_weighted_reward_as_recomputed_from_its_completions(grpo_gsm_run):
    workdir, rows, answers = grpo_gsm_run
    assert [r["step"] for r in rows] == [1, 2]
    text = (workdir / "completions.jsonl").read_text()
    logged = [json.loads(line) for line in text.splitlines()]
    for row in rows:
        mine = [c for c in logged if c["iteration"] == row["step"]]
        assert len(mine) == 8 * 2  # every prompt x group member, on this single host
        fmt, exact = _recompute(
            [c["prompt"] for c in mine], [c["completion"] for c in mine],
            [answers[c["prompt"]] for c in mine],
        )  # fmt: skip
        assert row["rewards/format_ok"] == pytest.approx(np.mean(fmt), abs=1e-6)
        applicable = [e for e in exact if e is not None]
        assert applicable and len(applicable) < len(exact)  # the None rows are left out
        assert row["rewards/exact_match"] == pytest.approx(np.mean(applicable), abs=1e-6)
        for c, f, e in zip(mine, fmt, exact):
            assert c["rewards"] == {"format_ok": f, "exact_match": e}
            assert c["reward"] == pytest.approx(0.5 * f + (e or 0.0), abs=1e-6)
        assert row["reward"] == pytest.approx(np.mean([c["reward"] for c in mine]), abs=1e-5)
    # The chain's end loads in transformers with the user's tokenizer and generates.
    tok = transformers.AutoTokenizer.from_pretrained(str(workdir / "hf"))
    assert tok.chat_template is not None and tok.eos_token == "<|im_end|>"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(workdir / "hf")).eval()
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False).shape[1] > len(
        ids
    )


def test_ppo_on_the_dataset_with_a_python_reward(user_model_folder, grpo_gsm_run, tmp_path):
    """PPO takes the same dataset and rewards (the host reward step GRPO uses)."""
    gsm = grpo_gsm_run[0].parent / "gsm.jsonl"
    argv = [
        "--preset", "tiny", "--workdir", str(tmp_path / "run"), "--init-from",
        str(user_model_folder), "--dataset", str(gsm), "--columns", "prompt=question",
        "--reward-fn", str(HELPERS / "gsm_rewards.py") + ":format_ok", "--steps", "1",
        "--batch-size", "8", "--max-new-tokens", "4", "--max-prompt-length", "32",
        "--log-every", "1",
    ]  # fmt: skip
    (row,) = driver_scripts.load("ppo").main(argv)
    logged = [
        json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().split("\n") if x
    ]
    assert len(logged) == 8 and {c["iteration"] for c in logged} == {1}
    fmt, _ = _recompute([], [c["completion"] for c in logged], [None] * 8)
    assert row["rewards/format_ok"] == pytest.approx(np.mean(fmt), abs=1e-6)
    assert row["score"] == pytest.approx(np.mean(fmt), abs=1e-6)  # weight 1: the score


def test_user_functions_reach_the_rl_configs(user_model_folder, monkeypatch, tmp_path):
    """`grpo.py --baseline F --kl-estimator G` and `ppo.py --kl-estimator G` hand the functions
    (module:function and path/file.py:function) to the method's config; the stage is stubbed."""
    monkeypatch.syspath_prepend(str(HELPERS))
    got = {}

    def stub(*args, **kwargs):
        got.update(kwargs)
        return None, []

    monkeypatch.setattr(stages, "train_critic_free", stub)
    monkeypatch.setattr(stages, "train_ppo", stub)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1?"}) + "\n" for i in range(8)))
    common = ["--init-from", str(user_model_folder), "--dataset", str(prompts),
              "--reward-fn", "gsm_rewards:format_ok", "--samples", "0"]  # fmt: skip
    driver_scripts.load("grpo").main(
        ["--workdir", str(tmp_path / "g"), *common, "--baseline", "gsm_rewards:group_median",
         "--kl-estimator", str(HELPERS / "gsm_rewards.py") + ":half_square",
         "--prompts-per-step", "8"]
    )  # fmt: skip
    rl = got["rl"]
    assert rl.baseline.__name__ == "group_median" and rl.kl_estimator.__name__ == "half_square"
    driver_scripts.load("ppo").main(
        ["--workdir", str(tmp_path / "p"), *common, "--kl-estimator", "gsm_rewards:half_square",
         "--batch-size", "8"]
    )  # fmt: skip
    assert got["ppo"].kl_estimator.__name__ == "half_square"


def test_kto_on_an_unpaired_dataset_starts_at_its_closed_form(user_model_folder, tmp_path):
    """`dpo.py --loss-type kto` on TRL's unpaired rows (prompt, completion, label). At step 1
    the policy is the reference: r = 0 and z0 = 0, so each row's loss is w (1 - sigmoid(0)) and
    the batch's is half the mean weight of its rows."""
    rows = [
        {"prompt": f"Tom has {i} apples.", "completion": f" He has {i}." if i % 3 else " dull",
         "label": bool(i % 3)}
        for i in range(16)
    ]  # fmt: skip
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--preset", "tiny", "--workdir", str(tmp_path / "run"), "--init-from",
        str(user_model_folder), "--dataset", str(path), "--loss-type", "kto", "--steps", "2",
        "--batch-size", "16", "--undesirable-weight", "1.5", "--warmup-steps", "0",
        "--log-every", "1", "--checkpoint-every", "2", "--learning-rate", "1e-2",
    ]  # fmt: skip
    out = driver_scripts.load("dpo").main(argv)
    first = out[0]
    weights = [1.0 if r["label"] else 1.5 for r in rows]
    assert first["loss"] == pytest.approx(0.5 * np.mean(weights), abs=1e-6)
    assert first["kl"] == 0.0 and first["desirable_fraction"] == pytest.approx(10 / 16)
    assert out[1]["loss"] != pytest.approx(first["loss"], abs=1e-6)  # it trained
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["sft", "reward_model", "dpo", "ppo", "grpo"])
def test_every_drivers_help_shows_the_model_and_data_flags(name, capsys):
    with pytest.raises(SystemExit) as info:
        driver_scripts.load(name).main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--init-from", "--dataset", "--columns", "--truncation"):
        assert flag in text, (name, flag)
    assert "--report-to" in text
    if name in ("ppo", "grpo"):
        assert "--reward-fn" in text and "--reward-weights" in text and "--kl-estimator" in text
    if name != "reward_model":
        assert "--samples" in text


# ---------------------------------------------------------------------------------------------
# Refused at the door.


def _variant(src, dst, *, config=None, tokenizer_config=None, drop=()):
    """A copy of the user's folder with fields of config.json / tokenizer_config.json changed and
    the files `drop` removed."""
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    for name, changes in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if changes:
            fields = json.loads((dst / name).read_text())
            fields.update(changes)
            (dst / name).write_text(json.dumps(fields))
    return dst


@pytest.fixture(scope="module")
def bad_folders(user_model_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_models")
    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    (root / "chats.jsonl").write_text(json.dumps(chats[0]) + "\n")
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    half = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]
    (root / "half.jsonl").write_text("".join(json.dumps(r) + "\n" for r in half))
    return {
        "chats": root / "chats.jsonl",
        "prompts": root / "prompts.jsonl",
        "half": root / "half.jsonl",
        "notemplate": _variant(
            user_model_folder, root / "notemplate", drop=("chat_template.jinja",)
        ),
        "model": user_model_folder,
        "mamba": _variant(user_model_folder, root / "mamba", config={"model_type": "mamba"}),
        "small": _variant(user_model_folder, root / "small", config={"vocab_size": 300}),
        "noeos": _variant(
            user_model_folder, root / "noeos", tokenizer_config={"eos_token": "<|no_such|>"}
        ),
    }


REFUSED = [
    ("grpo", ["--init-from", "{model}"], r"--init-from .*: its tokenizer \(vocabulary 600\) is not "
     r"the offline task's, and this run trains on the task's token ids"),
    ("sft", ["--init-from", "{model}"], r"its tokenizer \(vocabulary 600\) is not the offline"),
    ("ppo", ["--init-from", "{model}"], r"its tokenizer \(vocabulary 600\) is not the offline"),
    ("dpo", ["--init-from", "{model}"], r"not the offline task's.*or give the data as text"),
    ("dpo", ["--init-from", "{mamba}", "--pairs", "{pairs}"], r"--init-from .*mamba: .*mamba"),
    ("reward_model", ["--init-from", "{small}", "--pairs", "{pairs}"],
     r"the model's vocabulary \(300\) is smaller than .*small's tokenizer's \(600 ids\)"),
    ("dpo", ["--init-from", "{noeos}", "--pairs", "{pairs}"],
     r"--init-from .*noeos: its tokenizer: .*<\|no_such\|>"),
    ("dpo", ["--init-from", "{model}", "--dataset", "{prompts}"],
     r"--dataset .*prompts.jsonl: a prompt-only dataset \(columns: prompt, answer\); this run "
     r"needs preference data"),
    ("reward_model", ["--init-from", "{model}", "--dataset", "{half}"],
     r"--dataset .*half.jsonl:2: no 'rejected' \(a preference dataset needs it\)"),
    ("sft", ["--init-from", "{notemplate}", "--dataset", "{chats}"],
     r"--dataset .*chats.jsonl:1: conversational rows need a chat template"),
    ("dpo", ["--init-from", "{model}", "--dataset", "{chats}", "--pairs", "{pairs}"],
     r"--pairs and --dataset both given"),
    ("sft", ["--init-from", "{model}", "--dataset", "{chats}", "--truncation", "error",
             "--max-length", "8"], r"--dataset .*chats.jsonl:1: the row has \d+ tokens, more than "
                                   r"--max-length 8"),
    ("sft", ["--eval-dataset", "{chats}"], r"--eval-dataset / --assistant-only-loss apply to "),
    ("grpo", ["--init-from", "{model}", "--dataset", "{prompts}", "--reward-fn", "no_such:fn"],
     r"--reward-fn no_such:fn: no module 'no_such'"),
    ("grpo", ["--init-from", "{model}", "--dataset", "{prompts}"], r"--dataset needs one reward"),
    ("grpo", ["--init-from", "{model}", "--dataset", "{prompts}", "--reward-fn", "os:getcwd",
              "--reward-weights", "1", "2"], r"--reward-weights: 2 weights for 1 reward functions"),
    ("dpo", ["--init-from", "{model}", "--pairs", "{pairs}", "--loss", "os:no_such"],
     r"--loss os:no_such: os has no 'no_such'"),
    ("grpo", ["--init-from", "{model}", "--dataset", "{prompts}", "--reward-fn", "os:getcwd",
              "--baseline", "median"], r"--baseline median: choose one of mean, leave_one_out, or "
                                       r"module:function"),
    ("grpo", ["--algo", "reinforce_pp", "--baseline", "mean"],
     r"--algo reinforce_pp: reinforce_pp whitens .* it takes no baseline"),
    ("ppo", ["--init-from", "{model}", "--dataset", "{prompts}", "--reward-fn", "os:getcwd",
             "--kl-estimator", "no_such:k"], r"--kl-estimator no_such:k: no module 'no_such'"),
    ("sft", ["--report-to", "tensorboard", "none"], r"--report-to tensorboard none: none stands"),
]  # fmt: skip


@pytest.mark.parametrize(
    "name,argv,message", REFUSED, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(REFUSED)]
)
def test_refused_at_the_door_in_one_line(
    bad_folders, pairs_file, name, argv, message, tmp_path, monkeypatch, capsys
):
    workdir = tmp_path / "run"
    argv = [a.format(pairs=pairs_file, **bad_folders) for a in argv]
    main = driver_scripts.load(name).main
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--preset", "tiny", "--workdir", str(workdir)])
    monkeypatch.setattr(sys, "argv", sys.argv + argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not workdir.exists()  # nothing written


def test_the_library_checks_the_vocabulary_naming_its_arguments(user_model_folder, tmp_path):
    tok = data.load_tokenizer(user_model_folder)
    cfg = models.get_config("tiny", vocab_size=300)
    records = [data.PreferenceRecord("a", " b", " c")]
    message = r"tokenizer has 600 ids but cfg.vocab_size is 300"
    schedule = stages.Schedule(steps=1, batch_size=8, learning_rate=1e-3)
    rest = dict(
        workdir=tmp_path / "w", mesh=sharding.make_mesh(), schedule=schedule, max_length=32,
        max_prompt_length=8,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        stages.train_dpo(cfg, None, records, tok, betas=0.1, **rest)
    with pytest.raises(ValueError, match=message):
        stages.train_reward_model(cfg, None, records, records, tok, **rest)
    stages.check_vocab(models.get_config("tiny", vocab_size=600), tok)  # every id has a row
    assert not (tmp_path / "w").exists()
