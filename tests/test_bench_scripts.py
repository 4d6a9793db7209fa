"""Smoke tests of the benchmark scripts in experiments/ (tiny shapes, one timed step): they run,
print their table, and both sides of the DPO benchmark compute the same policy log-probs."""

import importlib.util
import pathlib
import sys

import pytest

_EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str):
    if str(_EXPERIMENTS) not in sys.path:  # the scripts import experiments/roofline.py
        sys.path.insert(0, str(_EXPERIMENTS))
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
    # The matmul-bound ceiling: model FLOPs at the faster library's GEMM rate.
    rates = results["gemm_tflops"]
    assert set(rates) == {"jax", "torch"} and all(r > 0 for r in rates.values())
    assert results["matmul_bound_s"] * max(rates.values()) * 1e12 == pytest.approx(
        bench.model_flops_per_step(bench.model_config(config), 2 * 2 * 16, 16)
    )
    assert "matmul alone" in out and "tokens/s at most" in out


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
    assert cfg.attention == "xla"
    # auto attention: cuDNN's flash attention on a GPU in bfloat16 only.
    gpu_bf16 = bench.Config(shape="gpt2", dtype="bfloat16")
    assert bench.model_config(gpu_bf16, "cuda").attention == "cudnn"
    assert bench.model_config(gpu_bf16, "cpu").attention == "xla"
    assert bench.model_config(bench.Config(shape="gpt2"), "cuda").attention == "xla"
    n = 12 * (4 * 768**2 + 2 * 768 * 3072) + 50257 * 768
    assert bench.model_flops_per_step(cfg, 1000, 512) == 1000 * (8 * n + 16 * 12 * 512 * 768)


def test_bench_generate_smoke(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    bench = _load("bench_generate")
    args = bench.Args(shape="tiny", batch=2, prompt_len=4, new_tokens=3, repeats=1)
    results = bench.main(args)
    out = capsys.readouterr().out
    assert "ratio" in out and "new tokens/s at most" in out
    assert results["ours"] > 0 and results["transformers"] > 0
    assert results["ratio"] == pytest.approx(results["ours"] / results["transformers"])
    bound = results["matmul_bound"]
    assert bound["seconds"] > 0
    assert set(bound["prefill_tflops"]) == set(bound["decode_tflops"]) == {"jax", "torch"}
