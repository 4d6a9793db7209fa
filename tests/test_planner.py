"""The planner (`rlhf_jax.planner`, `experiments/plan.py`) and the memory features it shows,
against arithmetic and independent computations:

- on cpu:8 the compiled step's argument bytes are the per-device bytes the partition rules imply
  for parameters, optimizer state, reference and batch (within 1 %);
- remat lowers the temporaries (on a TPU topology); chunked log-probs lower them by at least
  the [B, T, V] float32 logits and equal a NumPy log-softmax; gradient accumulation lowers them
  and leaves the update equal (<= 1e-5);
- DPO steps compile for a real TPU topology (v5e:2x2) through libtpu: one the compiler refuses
  for memory is a row that does not fit, and chunked log-probs make it fit;
- the command line prints the table and refuses bad flags with the flag named.
"""

import dataclasses
import importlib.util
import math

import jax
import numpy as np
import optax
import pytest
from helpers import drivers as driver_scripts

from rlhf_jax import losses, models, planner, train
from rlhf_jax import sharding as sh
from rlhf_jax.errors import ConfigError

TINY = (("n_layers", 2), ("d_model", 64), ("n_heads", 4), ("n_kv_heads", 2), ("d_ff", 128),
        ("vocab_size", 512))  # fmt: skip


_needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="needs libtpu: make test installs it (pip install -e '.[tpu-plan]')",
)


def _spec(**kw):
    base = dict(model="llama-3.2-1b", topology="cpu:8", batch=8, seq_len=64, max_new_tokens=16,
                group_size=2, model_overrides=TINY)  # fmt: skip
    return planner.PlanSpec(**{**base, **kw})


def _compiled(spec):
    devices, _, _ = planner.topology_devices(spec.topology)
    mesh = sh.make_mesh(**sh.parse_mesh_spec(spec.mesh), devices=devices)
    program = planner.programs(spec)[0]
    return program, planner.compile_program(program, mesh), mesh


def test_argument_bytes_are_the_partition_rules_bytes_per_device():
    spec = _spec(algo="dpo", mesh="data=1,fsdp=8", remat="none")
    program, compiled, mesh = _compiled(spec)
    # Per device: every state leaf's shard (params, AdamW moments, the reference copy, scalars)
    # as the partition rules split it, and the six [B, T] int32 batch arrays split 8 ways.
    shardings = sh.state_shardings(mesh, program.state)
    want = 0
    for leaf, s in zip(jax.tree.leaves(program.state), jax.tree.leaves(shardings)):
        want += math.prod(s.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    n_params = sum(x.size for x in jax.tree.leaves(program.state.params))
    want += 6 * (8 * 64 * 4) // 8
    got = compiled.memory_analysis().argument_size_in_bytes
    assert got == pytest.approx(want, rel=0.01)
    # Sharded, not replicated: params + 2 moments + reference is 4 copies of n_params float32
    # split 8 ways (norm scales and other small leaves replicated).
    assert got < 4 * 4 * n_params / 8 * 1.2
    # SimPO holds no reference: the same step without the reference's bytes.
    _, simpo, _ = _compiled(dataclasses.replace(spec, loss_type="simpo"))
    ref_bytes = sum(
        math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(jax.tree.leaves(program.state.frozen), jax.tree.leaves(shardings.frozen))
    )
    assert simpo.memory_analysis().argument_size_in_bytes == pytest.approx(
        got - ref_bytes, rel=0.01
    )
    row = planner.analyse(program, compiled, mesh, planner.CHIPS["v5e"])
    assert row["args_gb"] == pytest.approx(got / 1e9)
    assert row["fits"] is True and row["roofline_ms"] > 0 and 0 < row["mfu"] <= 1


def _temp(spec):
    return _compiled(spec)[1].memory_analysis().temp_size_in_bytes


@_needs_libtpu
def test_remat_lowers_the_temporaries_on_tpu():
    """On v5e (XLA:CPU's buffer assignment reports the same temporaries with or without remat,
    although the rematerialised program recomputes: more dots)."""
    long = (("d_model", 128), ("d_ff", 2048))  # the MLP's [B, T, F] activations dominate
    kw = dict(algo="sft", topology="v5e:2x2", mesh="data=1,fsdp=4", batch=8, seq_len=1024)
    none, full = (
        _temp(_spec(remat=r, model_overrides=TINY + long, **kw)) for r in ("none", "full")
    )
    assert full < 0.6 * none, (none, full)


def test_chunked_logps_equal_numpy_and_hold_no_full_logits():
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 13, 8, 40
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    weight = rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t))
    for softcap, vocab_major in ((None, False), (3.0, True)):
        w = weight.T.copy() if vocab_major else weight
        got, hit, ent = losses.chunked_target_logps(
            hidden, w, targets, chunk=5, softcap=softcap, vocab_major=vocab_major, temperature=0.7
        )  # T = 13: the last chunk is padded
        logits = hidden.astype(np.float64) @ weight.astype(np.float64)
        if softcap is not None:
            logits = softcap * np.tanh(logits / softcap)
        logits = logits / 0.7
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        want = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz
        np.testing.assert_allclose(got, want, atol=2e-5)
        np.testing.assert_array_equal(hit, logits.argmax(-1) == targets)
        logp = logits - logz[..., None]
        np.testing.assert_allclose(ent, -(np.exp(logp) * logp).sum(-1), atol=2e-5)

    # The case, a DPO step with V = 128256 (Llama 3) and T = 4096, compiled from abstract
    # inputs: the chunked step's temporaries are lower by at least the [2B, T, V] float32 logits.
    vocab = (("vocab_size", 128256), ("n_layers", 1))
    kw = dict(algo="dpo", topology="cpu:1", mesh="data=1", batch=1, seq_len=4096,
              model_overrides=TINY + vocab)  # fmt: skip
    whole, chunked = _temp(_spec(**kw)), _temp(_spec(logits_chunk=512, **kw))
    logits_bytes = 2 * 1 * 4096 * 128256 * 4
    assert chunked <= whole - logits_bytes, (whole, chunked, logits_bytes)


def test_chunked_rl_losses_equal_the_full_logits():
    """PPO's and the critic-free loss (log-probs and entropy at a temperature) with
    `logits_chunk` equal the full-logits loss, value and gradient."""
    cfg = models.get_config("llama-tiny", vocab_size=64, max_len=32, n_layers=1)
    chunked = dataclasses.replace(cfg, logits_chunk=3)
    params = models.init_params(cfg, jax.random.key(0))
    value = models.init_value_params(cfg, jax.random.key(1), params)
    rng = np.random.default_rng(0)
    b, p, n = 4, 5, 7
    mb = {
        "query_tokens": rng.integers(2, 64, (b, p)), "query_mask": np.ones((b, p), np.int32),
        "response_tokens": rng.integers(2, 64, (b, n)),
        "response_mask": (np.arange(n)[None] < rng.integers(3, n + 1, (b, 1))).astype(np.int32),
        "logps": rng.normal(-4.0, 0.3, (b, n)).astype(np.float32),
        "values": rng.normal(size=(b, n)).astype(np.float32),
        "advantages": rng.normal(size=(b, n)).astype(np.float32),
        "returns": rng.normal(size=(b, n)).astype(np.float32),
    }  # fmt: skip
    ppo = train.PPOConfig(temperature=0.8)
    cf = train.CriticFreeConfig(algo="grpo", group_size=2, max_new_tokens=n, temperature=0.8)
    ro = train.critic_free.CriticFreeRollout(
        query_tokens=mb["query_tokens"], query_mask=mb["query_mask"],
        response_tokens=mb["response_tokens"], response_mask=mb["response_mask"],
        logps=mb["logps"], ref_logps=np.zeros((b, n), np.float32),
        scores=np.zeros((b,), np.float32), advantages=mb["advantages"],
    )  # fmt: skip

    def run(c):
        ppo_loss = train.make_ppo_loss(models.Transformer(c), models.ValueModel(c), ppo)
        cf_loss = train.critic_free.make_critic_free_loss(models.Transformer(c), cf)
        a = jax.value_and_grad(lambda q: ppo_loss(q, mb), has_aux=True)((params, value))
        f = jax.value_and_grad(lambda q: cf_loss(q, ro, frozen=None, hparams={}), has_aux=True)
        return a, f(params)

    for (whole, g_whole), (part, g_part) in zip(
        jax.jit(lambda: run(cfg))(), jax.jit(lambda: run(chunked))()
    ):
        np.testing.assert_allclose(part[0], whole[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(part[1]["entropy"], whole[1]["entropy"], rtol=1e-5)
        for x, y in zip(jax.tree.leaves(g_part), jax.tree.leaves(g_whole)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def _pairs(cfg, b=8, t=12, seed=0):
    rng = np.random.default_rng(seed)
    batch = {}
    for s in ("chosen", "rejected"):
        tokens = rng.integers(2, cfg.vocab_size, (b, t)).astype(np.int32)
        loss_mask = np.ones_like(tokens)
        loss_mask[:, :4] = 0
        batch.update({f"{s}_tokens": tokens, f"{s}_attention_mask": np.ones_like(tokens),
                      f"{s}_loss_mask": loss_mask})  # fmt: skip
    return batch


def test_microbatches_lower_the_temporaries_and_keep_the_update():
    cfg = models.get_config("llama-tiny", vocab_size=64, max_len=32, n_layers=1)
    params = models.init_params(cfg, jax.random.key(0))
    ref = jax.tree.map(lambda x: x * 1.01, params)
    loss = train.make_dpo_loss(models.Transformer(cfg))
    tx = optax.sgd(1.0)
    state = train.create_train_state(params, tx, 0, frozen=ref, hparams={"beta": 0.1})
    batch = _pairs(cfg)
    one, m1 = jax.jit(train.make_step(loss, tx))(state, batch)
    four, m4 = jax.jit(train.make_step(loss, tx, microbatches=4))(state, batch)
    assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-6)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="microbatches=3 must divide"):
        jax.jit(train.make_step(loss, tx, microbatches=3))(state, batch)
    kw = dict(algo="dpo", topology="cpu:1", batch=8, seq_len=64)
    assert _temp(_spec(microbatches=4, **kw)) < _temp(_spec(**kw))


def test_rl_and_lora_programs_compile_with_the_sampler():
    spec = _spec(algo="grpo", lora_rank=4, quantize="int8", mesh="data=2,fsdp=4", seq_len=24,
                 max_new_tokens=8, model_overrides=TINY + (("n_layers", 1),))  # fmt: skip
    rows = planner.plan(spec)
    assert [r["program"] for r in rows] == ["step", "generate"]
    assert all(r["args_gb"] > 0 and r["model_tflop"] > 0 for r in rows)
    assert rows[0]["tokens"] == 8 * 2 * 24 and rows[1]["tokens"] == 8 * 2 * 8  # G = 2


@pytest.mark.parametrize("chunk", [64, None], ids=["chunked", "whole_logits"])
def test_the_fused_rl_iteration_keeps_each_devices_rows(chunk):
    """GRPO's one-program iteration (sample, then the forwards of the sampled rows, then the
    update) on fsdp=8: every device computes only its own rows. Without the row constraints
    (`sharding.constrain`) sharding propagation followed the FSDP-split width of the weights after
    the sampler's loop and every device held every row's logits (0.59 GB here; Gemma-2-9B GRPO on
    v6e-16 asked for 68 GB per chip for two layers' worth), more than the one chunk of logits for
    all rows that this bound allows. With chunked log-probs the vocabulary-parallel chunk
    (`sharding.vocab_parallel`) also splits the rows; with the whole logits (N = 64 positions,
    the bound's chunk) only the row constraints do (1.1 GB of temporaries without them)."""
    vocab, n = 32768, 64
    spec = _spec(algo="grpo", mesh="data=1,fsdp=8", batch=8, group_size=4, seq_len=128,
                 max_new_tokens=n, logits_chunk=chunk, remat="full",
                 model_overrides=TINY[:-1] + (("n_layers", 1), ("vocab_size", vocab)))  # fmt: skip
    (row,) = planner.plan(spec, names=["step"])
    all_rows_chunk = 8 * 4 * (chunk or n) * vocab * 4  # [P*G, chunk, V] float32 on one device
    assert row["temp_gb"] * 1e9 < all_rows_chunk, row["temp_gb"]


@pytest.mark.parametrize("model", ["llama-3.2-1b", "llama-3.1-8b"], ids=["tied", "lm_head"])
def test_chunked_log_probs_never_put_the_whole_output_layer_on_one_device(model, monkeypatch):
    """A DPO step with chunked log-probs on fsdp=8: the output layer stays split over the
    vocabulary inside the chunk loop (`sharding.vocab_parallel`), so no device holds the whole
    [D, V] weight or a whole gradient of it. Without it (checked here by switching it off) each
    device gathers the weight and builds a whole float32 gradient per use: 8 GB against 3 GB of
    temporaries on 4 layers of the Llama-3.1-8B DPO step on v5e-16."""
    d, v = 256, 32768
    wide = (("d_model", d), ("n_heads", 4), ("n_kv_heads", 2), ("d_ff", 512), ("n_layers", 1),
            ("vocab_size", v))  # fmt: skip
    spec = _spec(model=model, algo="dpo", mesh="data=1,fsdp=8", batch=8, seq_len=256,
                 logits_chunk=64, remat="full", model_overrides=wide)  # fmt: skip
    mesh = sh.make_mesh(data=1, fsdp=8, devices=jax.devices()[:8])
    whole = [f"{dt}[{a},{b}]" for dt in ("f32", "bf16") for a, b in ((d, v), (v, d))]

    def compile_step():
        (prog,) = [p for p in planner.programs(spec) if p.name == "step"]
        compiled = planner.compile_program(prog, mesh)
        return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()

    temp, text = compile_step()
    assert not [w for w in whole if w in text]
    monkeypatch.setattr(sh, "vocab_parallel", lambda kind, x, **kw: x)
    temp_off, text_off = compile_step()
    assert [w for w in whole if w in text_off]
    assert temp < temp_off - 2 * d * v * 4, (temp, temp_off)  # at least two float32 gradients


@_needs_libtpu
def test_the_compilers_out_of_memory_is_a_row_that_does_not_fit_and_chunking_fits():
    """A DPO step whose [2B, T, V] logits (V = 65536) exceed a v5e chip (compiled for v5e:2x2
    through libtpu): the TPU compiler refuses it and the row says so; with chunked log-probs
    the same step fits, and its roofline is v5e's."""
    wide_vocab = TINY[:-1] + (("vocab_size", 65536), ("n_layers", 1))
    kw = dict(algo="dpo", topology="v5e:2x2", mesh="data=1,fsdp=4", batch=64, seq_len=2048,
              model_overrides=wide_vocab)  # fmt: skip
    (oom,) = planner.plan(_spec(**kw))
    assert oom["fits"] is False and "exceeds available HBM" in oom["error"]
    logits_per_chip = 2 * 64 * 2048 * 65536 * 4 / 4
    assert oom["temp_gb"] * 1e9 > logits_per_chip
    (chunked,) = planner.plan(_spec(logits_chunk=256, **kw))
    assert chunked["fits"] is True and chunked["total_gb"] < oom["total_gb"] - logits_per_chip / 1e9
    assert chunked["chip"] == "v5e" and chunked["devices"] == 4
    assert chunked["hbm_gb"] == pytest.approx(16 * 2**30 / 1e9)
    # The roofline is the larger of the compute and memory terms at v5e's figures.
    chip = planner.CHIPS["v5e"]
    compute = max(chunked["xla_tflop"], chunked["model_tflop"]) * 1e12 / chip.peak_flops
    memory = chunked["xla_gb_accessed"] * 1e9 / chip.hbm_bandwidth
    assert chunked["roofline_ms"] == pytest.approx(1e3 * max(compute, memory), rel=1e-6)
    assert chunked["tokens_per_s"] == pytest.approx(2 * 64 * 2048 / (chunked["roofline_ms"] / 1e3))


def test_plan_cli_prints_the_table_and_names_bad_flags(capsys):
    plan = driver_scripts.load("plan")
    argv = ["--model", "tiny", "--algo", "sft", "--topology", "cpu:8", "--batch", "8",
            "--seq-len", "32", "--remat", "none"]  # fmt: skip
    rows = plan.main(argv)
    out = capsys.readouterr().out
    assert "total GB" in out and "step" in out and rows[0]["devices"] == 8
    local = [*argv[:4], "--topology", "local", "--run", "--run-steps", "1", *argv[6:]]
    (timed,) = plan.main(local)  # the local devices (8 host devices here), timed for real
    assert timed["measured_ms"] > 0 and timed["measured_tokens_per_s"] > 0
    assert "measured (step)" in capsys.readouterr().out
    for bad, match in (
        (["--ref", "base"], "--ref: ref 'base' is the LoRA base"),
        (["--topology", "v9:2x2"], "--topology/--mesh: topology 'v9:2x2'"),
        (["--mesh", "data=3"], "--topology/--mesh: mesh"),
        (["--run"], "--run times real steps: use --topology local"),
    ):
        with pytest.raises(ConfigError, match=match):
            plan.main(argv + bad)


def test_plan_reads_a_model_folder_and_names_a_bad_model(user_model_folder, tmp_path, capsys):
    """--model PATH: the folder's config.json (no weights); an unknown preset, a folder without
    config.json and an unsupported model_type are one ConfigError naming --model."""
    import json
    import shutil

    plan = driver_scripts.load("plan")
    argv = ["--algo", "sft", "--topology", "cpu:8", "--batch", "8", "--seq-len", "32"]
    (row,) = plan.main(["--model", str(user_model_folder), *argv])
    out = capsys.readouterr().out
    want = models.config_from_pretrained(str(user_model_folder))
    assert f"({want.num_params() / 1e9:.2f}B params)" in out and row["program"] == "step"
    spec = planner.PlanSpec(model=str(user_model_folder / "config.json"), algo="sft",
                            topology="cpu:8", mesh="data=8", batch=8, seq_len=32)  # fmt: skip
    cfg = planner.model_config(spec)
    assert (cfg.vocab_size, cfg.n_layers, cfg.family) == (1280, 2, "qwen2")
    assert "XLA TFLOP: what the compiler counts" in out and "a bound, not a measurement" in out
    mamba = tmp_path / "mamba"
    shutil.copytree(user_model_folder, mamba)
    fields = json.loads((mamba / "config.json").read_text())
    (mamba / "config.json").write_text(json.dumps({**fields, "model_type": "mamba"}))
    for model, message in (
        ("no_such", r"--model no_such: 'no_such' is neither a preset \(.*tiny\) nor a folder"),
        (str(tmp_path), r"nor a folder with a config.json"),
        (str(mamba), r"--model .*mamba: unsupported model_type 'mamba'"),
    ):
        with pytest.raises(ConfigError, match=message):
            plan.main(["--model", model, *argv])


@_needs_libtpu
def test_a_state_over_the_chips_hbm_is_reported_without_compiling(monkeypatch):
    """Llama-3.1-70B DPO on four v5e chips: policy + Adam moments + reference in float32 are
    16 bytes a parameter, split over fsdp = 4: about 282 GB a chip against 16 GiB, said at once
    from the partition rules; nothing is compiled."""
    from rlhf_jax.planner import report

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled a program whose state cannot fit")

    monkeypatch.setattr(report, "compile_or_oom", no_compile)
    spec = planner.PlanSpec(model="llama-3.1-70b", algo="dpo", topology="v5e:2x2",
                            mesh="data=1,fsdp=4", batch=8, seq_len=1024)  # fmt: skip
    (row,) = planner.plan(spec)
    n = planner.model_config(spec).num_params()
    assert row["fits"] is False and row["compiled"] is False
    assert row["args_gb"] == pytest.approx(16 * n / 4 / 1e9, rel=0.01)
    assert "the state alone" in row["error"] and "not compiled" in row["error"]
