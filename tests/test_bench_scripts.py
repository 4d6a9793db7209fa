"""Smoke tests of the benchmark scripts in experiments/ (tiny shapes, one timed step): they run,
print their table, and both sides of the DPO benchmark compute the same policy log-probs."""

import importlib.util
import pathlib
import sys

import pytest

_EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


def test_bench_dpo_step_smoke(capsys, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    bench = _load("bench_dpo_step")
    monkeypatch.setattr(sys, "argv", ["bench_dpo_step.py", "--shape", "tiny", "--pairs", "2"])
    config = bench.tyro.cli(bench.Config)
    assert (config.shape, config.pairs, config.seq_len) == ("tiny", 2, 128)

    config = bench.Config(
        shape="tiny", n_layers=1, pairs=2, seq_len=16, device="cpu", warmup=0, iters=1, rounds=1
    )
    results = bench.main(config)
    out = capsys.readouterr().out
    assert "ratio ours / torch" in out
    for side in ("jax", "torch"):
        assert results[side]["tokens_per_s"] > 0 and len(results[side]["step_times"]) == 1
    # Same model and batch on both sides: the first step's policy log-probs agree.
    assert results["logps_rel_diff"] < 1e-5
    assert results["jax"]["mfu"] is None  # no known peak on CPU


def test_bench_dpo_step_batch_and_flops():
    bench = _load("bench_dpo_step")
    config = bench.Config(pairs=3, seq_len=32)
    batch = bench.make_batch(config, vocab_size=50)
    for side in ("chosen", "rejected"):
        attn, loss = batch[f"{side}_attention_mask"], batch[f"{side}_loss_mask"]
        assert attn.shape == loss.shape == (3, 32)
        assert (loss <= attn).all() and (loss[:, : 32 // 4] == 0).all()  # prompt not in the loss
        assert (attn.sum(1) >= 24).all() and (loss.sum(1) > 0).all()
        assert (batch[f"{side}_tokens"][attn == 0] == 0).all()  # right padding with pad id 0
    # Chosen and rejected share their prompt.
    p = 32 // 4
    assert (batch["chosen_tokens"][:, :p] == batch["rejected_tokens"][:, :p]).all()
    # FLOPs: tokens * (8 N + 16 L T D), N = L (4 D^2 + 2 D F) + V D.
    cfg = bench.model_config(bench.Config(shape="gpt2"))
    n = 12 * (4 * 768**2 + 2 * 768 * 3072) + 50257 * 768
    assert bench.model_flops_per_step(cfg, 1000, 512) == 1000 * (8 * n + 16 * 12 * 512 * 768)
