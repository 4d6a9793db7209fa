"""rlhf_jax.run.handover: a model between stages (a workdir's hf/ folder, the HF folder itself, a
reward model's trunk and head) read back exactly as saved, dtype kept; check_model's messages.
On the conftest's `word_lm` and `word_tokenizer`."""

import dataclasses

import jax
import numpy as np
import pytest
from helpers.run_inputs import RunConfig

from rlhf_jax import models
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import cli, handover


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_models_round_trip_through_workdirs_and_hf_folders(tmp_path, word_lm, word_tokenizer):
    cfg, params = word_lm
    cli.write_run_config(tmp_path / "sft", RunConfig())
    with pytest.raises(ConfigError, match="workdir without hf/: run its stage"):
        handover.load_init_params(tmp_path / "sft")
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    folder = handover.save_lm(tmp_path / "sft", bf16, params, tokenizer=word_tokenizer)
    assert folder == tmp_path / "sft" / "hf" and (folder / "tokenizer.json").is_file()
    got_cfg, got = handover.load_init_params(tmp_path / "sft")
    assert got_cfg == bf16  # dtype kept through model_config.json
    _assert_tree_equal(got, params)
    got_cfg, got = handover.load_init_params(folder, dtype="float32")  # the HF folder itself
    assert got_cfg == cfg
    _assert_tree_equal(got, params)

    rm_params = jax.device_get(models.init_reward_params(cfg, jax.random.PRNGKey(1), params))
    handover.save_reward_model(tmp_path / "rm", cfg, rm_params)
    _assert_tree_equal(handover.load_reward_model(tmp_path / "rm")[1], rm_params)
    _assert_tree_equal(handover.load_init_params(tmp_path / "rm")[1], params)  # its trunk
    with pytest.raises(ConfigError, match="Hugging Face model folder .*head.safetensors"):
        handover.load_reward_model(tmp_path / "sft" / "hf")
    with pytest.raises(ConfigError, match="no such file or folder"):
        handover.load_init_params(tmp_path / "missing")
    handover.check_model(cfg, word_tokenizer, max_length=32)
    with pytest.raises(ConfigError, match="model's vocabulary \\(8\\) is smaller"):
        handover.check_model(dataclasses.replace(cfg, vocab_size=8), word_tokenizer, max_length=32)
    with pytest.raises(ConfigError, match="rows of 33 tokens exceed the model's context"):
        handover.check_model(cfg, word_tokenizer, max_length=33)


def test_the_hf_folder_carries_the_tokenizers_special_token_ids(tmp_path, word_lm):
    """config.json and generation_config.json hold the BOS / EOS / pad ids of the tokenizer
    saved beside the weights, as `transformers` reads them."""
    import json

    import transformers
    from helpers.run_inputs import make_tokenizer

    from rlhf_jax import data

    cfg, params = word_lm
    plain = make_tokenizer()
    tok = data.Tokenizer(plain.backend, eos_token="<|endoftext|>", pad_token="good",
                         bos_token="the", chat_template="{{ messages[0]['content'] }}")  # fmt: skip
    folder = handover.save_lm(tmp_path / "run", cfg, params, tokenizer=tok)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    assert tok.bos_id is not None and len(set(ids.values())) == 3
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in ids} == ids
    generation = transformers.GenerationConfig.from_pretrained(str(folder))
    assert {k: getattr(generation, k) for k in ids} == ids
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == tuple(ids.values())
    assert hf.chat_template == tok.chat_template
