"""`run.cli.prepare_init`, the start-up every training driver shares: its order (a bad flag is
reported before the task is loaded or anything is written), what it resolves (mesh, model config
with the memory flags applied once, LoRA config) and `Start.load_params`."""

import dataclasses
from typing import Literal

import jax
import numpy as np
import pytest
import tokenizers

from rlhf_jax import data, models
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import cli, handover


@dataclasses.dataclass(frozen=True)
class Config(cli.DistributedFlags, cli.MemoryFlags, cli.LoraFlags):
    workdir: str = "unused"
    init_from: str | None = None
    batch_size: int = 8
    microbatches: int = 1
    max_length: int = 16
    beta: float = 0.1
    mode: Literal["a", "b"] = "a"
    seed: int = 3
    mesh: str = "data=-1"


TINY = models.get_config("tiny", vocab_size=32, max_len=16, d_model=32, n_layers=2, n_heads=2)


def _tokenizer() -> data.Tokenizer:
    """A word-level tokenizer of 30 ids (EOS among them)."""
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 30)}}
    return data.Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "w1")))


def _start(config, **kw):
    loaded = []

    def task():
        loaded.append(True)
        return "task"

    kw.setdefault("random_init", lambda tok: TINY)
    start = cli.prepare_init(config, task=task, tokenizer_of=lambda t: _tokenizer(), **kw)
    return start, loaded


@pytest.mark.parametrize(
    "change, match",
    [
        ({"beta": -1.0}, r"--beta -1.0: must be > 0"),
        ({"mode": "c"}, r"--mode 'c': choose one of a, b"),
        ({"batch_size": 7}, r"--batch-size"),
        ({"microbatches": 3}, r"--microbatches 3"),
        ({"init_from": "/no/such/folder"}, r"--init-from /no/such/folder: no such file"),
        ({"lora_dropout": 0.5}, r"--lora-dropout 0.5: must be 0 for the on-policy methods"),
        ({"logits_chunk": 0}, r"--logits-chunk 0: must be >= 1"),
    ],
)
def test_a_bad_flag_is_reported_before_the_task_is_loaded(change, match):
    config = dataclasses.replace(Config(), **change)
    loaded = []
    with pytest.raises(ConfigError, match=match):
        cli.prepare_init(
            config,
            random_init=lambda tok: TINY,
            task=lambda: loaded.append(True),
            rules=cli.ON_POLICY_RULES,
        )
    assert loaded == []


def test_init_from_is_required_without_a_random_init():
    with pytest.raises(ConfigError, match="DPO starts from"):
        cli.prepare_init(Config(), required="DPO starts from the SFT model: pass --init-from")


def test_the_model_is_checked_against_the_tokenizer_and_the_row_length():
    small = dataclasses.replace(TINY, vocab_size=16)
    with pytest.raises(ConfigError, match=r"vocabulary \(16\) is smaller"):
        _start(Config(), random_init=lambda tok: small)
    with pytest.raises(ConfigError, match="rows of 17 tokens exceed the model's context of 16"):
        _start(dataclasses.replace(Config(), max_length=17))
    seen = []
    _start(Config(), check=seen.append)
    assert seen == [TINY]  # the driver's own check sees the model before the memory flags


def test_memory_flags_lora_and_a_random_init():
    config = dataclasses.replace(
        Config(), remat="full", logits_chunk=4, scan_layers="on", lora_rank=2, lora_alpha=4.0
    )
    start, loaded = _start(config)
    assert loaded == [True] and start.task == "task" and start.tokenizer.vocab_size == 30
    want = dataclasses.replace(TINY, remat="full", logits_chunk=4, scan_layers=True)
    assert start.model_config == want
    assert (start.lora.rank, start.lora.alpha, start.lora.dropout) == (2, 4.0, 0.0)
    assert start.mesh.devices.size == jax.device_count() and start.init_from is None
    params = start.load_params()
    expected = models.init_params(want, jax.random.key(3))  # the config's seed
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, ref)
    plain, _ = _start(Config())
    assert plain.model_config == TINY and plain.lora is None  # "keep" / None: the model's own


def test_init_from_a_workdir_loads_its_weights(tmp_path):
    params = models.init_params(TINY, jax.random.key(7))
    handover.save_lm(tmp_path / "sft", TINY, params)
    config = dataclasses.replace(Config(), init_from=str(tmp_path / "sft"), remat="dots")
    start, _ = _start(config, random_init=None)
    assert start.init_folder == tmp_path / "sft" / "hf"
    assert start.model_config == dataclasses.replace(TINY, remat="dots")
    for got, ref in zip(jax.tree.leaves(start.load_params()), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, ref)
