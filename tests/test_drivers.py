"""The four drivers end to end on their tiny presets: sft -> reward_model and dpo (--init-from the
SFT workdir) -> ppo (--reward the reward-model workdir, and ground-truth); resume after a
complete run, with more steps, and after SIGKILL (bit-identical); bad configurations.

The SFT run is the session's `tiny_sft_workdir` (conftest, shared with test_multihost_drivers.py)
and read-only: a test that reruns it works on a copy. The synthetic task is prepared once into the
repository's data/ (or $RLHF_JAX_DATA), as the drivers do by default. Drivers run in-process
through `main(argv)`; only the killed run is a subprocess.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import drivers as driver_scripts
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax import data, models, sharding, train
from rlhf_jax.data import synthetic, tasks
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import cli, handover
from rlhf_jax.run.metrics_writer import read_metrics
from rlhf_jax.stages import ppo as stages_ppo

_ROOT = Path(__file__).resolve().parents[1]
_NAMES = ("sft", "reward_model", "dpo", "ppo")


def _load(name):
    return driver_scripts.load(name)


@pytest.fixture(scope="module")
def drivers():
    return {name: _load(name) for name in _NAMES}


def _check_outputs(workdir, rows, last_step):
    """metrics.jsonl rows with step and a finite loss, as returned; TensorBoard events."""
    assert rows and rows == read_metrics(workdir)
    assert all("step" in r and math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["step"] == last_step
    assert any(
        p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir()
    )


@pytest.fixture(scope="module")
def sft(tiny_sft_workdir):
    """(workdir, argv, rows) of the session's tiny SFT run (conftest): read-only here."""
    return tiny_sft_workdir


@pytest.fixture(scope="module")
def reward_model(drivers, sft, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rm") / "run"
    argv = ["--preset", "tiny", "--workdir", str(workdir), "--init-from", str(sft[0])]
    return workdir, drivers["reward_model"].main(argv)


def test_sft_tiny(sft):
    workdir, _, rows = sft
    _check_outputs(workdir, rows, 60)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (workdir / "hf" / "model.safetensors").is_file()
    cfg, _ = handover.load_init_params(workdir)
    assert (cfg.d_model, cfg.n_layers) == (64, 1) and cfg.vocab_size % 128 == 0


def test_rerun_of_a_complete_run_does_no_work(drivers, sft, monkeypatch, tmp_path):
    reference, argv, rows = sft
    # On a copy: even a rerun that does no work republishes hf/, rewrites run_config.json,
    # model_config.json and metrics.jsonl (same bytes) and adds a TensorBoard file.
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    argv = argv[:-1] + [str(workdir)]
    metrics = (workdir / "metrics.jsonl").read_bytes()
    ckpts = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    compiles = []
    monkeypatch.setattr(sharding, "compile_step", lambda *a, **k: compiles.append(a))
    assert drivers["sft"].main(argv) == rows
    assert compiles == []
    assert (workdir / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ckpts == ["30", "60"]


def test_sigkill_then_rerun_is_bit_identical_and_more_steps_continue(drivers, sft, tmp_path):
    reference, argv, rows = sft
    workdir = tmp_path / "run"
    argv = argv[:-1] + [str(workdir)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(_ROOT / "experiments" / "sft.py"), *argv],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while not (workdir / "checkpoints" / "30").is_dir():
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert not (workdir / "hf").exists()  # killed before the end

    assert drivers["sft"].main(argv) == rows
    assert (workdir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    weights = "hf/model.safetensors"
    assert (workdir / weights).read_bytes() == (reference / weights).read_bytes()

    more = drivers["sft"].main(argv + ["--steps", "70"])
    assert [r["step"] for r in more] == [10, 20, 30, 40, 50, 60, 70] and more[:6] == rows
    assert math.isfinite(more[-1]["loss"])


def test_reward_model_tiny(drivers, reward_model):
    workdir, rows = reward_model
    _check_outputs(workdir, rows, 30)
    assert (workdir / "pairs.jsonl").is_file() and (workdir / "pairs_test.jsonl").is_file()
    cfg, params = handover.load_reward_model(workdir)
    assert params["head"]["kernel"].shape == (cfg.d_model, 1)
    # The held-out accuracy logged at the last step, recomputed: the saved reward model on all
    # held-out pairs as one batch, r(chosen) > r(rejected) counted in NumPy.
    config = drivers["reward_model"].PRESETS["tiny"]
    tok = tasks.task_tokenizer(synthetic.load_task(synthetic.prepare(config.data_dir)))
    pairs = data.read_preference_jsonl(workdir / "pairs_test.jsonl")
    batch = data.collate_preferences(
        pairs,
        tok,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        buckets=None,
    )
    rm = models.RewardModel(cfg)
    r_c, r_r = (
        np.asarray(rm.apply({"params": params}, batch[f"{s}_tokens"], batch[f"{s}_attention_mask"]))
        for s in ("chosen", "rejected")
    )
    assert len(pairs) >= 20 and 0.0 < np.mean(r_c > r_r) < 1.0
    np.testing.assert_allclose(rows[-1]["eval/accuracy"], np.mean(r_c > r_r), atol=1e-6)
    np.testing.assert_allclose(rows[-1]["eval/margin"], np.mean(r_c - r_r), rtol=1e-4, atol=1e-6)


def test_dpo_tiny_with_precomputed_reference(drivers, sft, reward_model, tmp_path):
    argv = ["--preset", "tiny", "--workdir", str(tmp_path), "--init-from", str(sft[0])]
    rows = drivers["dpo"].main(argv + ["--precompute-reference", "--beta", "0.2"])
    _check_outputs(tmp_path, rows, 30)
    assert {"rewards/accuracy", "rewards/margin", "grad_norm", "update_norm"} <= set(rows[-1])
    assert (tmp_path / "reference_logps.npz").is_file() and (tmp_path / "hf").is_dir()
    # Same seed and SFT model as the reward model: the same pairs.
    assert (tmp_path / "pairs.jsonl").read_bytes() == (reward_model[0] / "pairs.jsonl").read_bytes()


def test_dpo_memory_flags_change_how_not_what_it_computes(drivers, sft, tmp_path):
    """--microbatches 2 (gradient accumulation), --remat full, --logits-chunk 8 and
    --scan-layers on (the flags experiments/plan.py tries out) give the same run as the plain
    command, to round-off."""
    argv = ["--preset", "tiny", "--init-from", str(sft[0]), "--steps", "4", "--log-every", "1",
            "--checkpoint-every", "4", "--warmup-steps", "1"]  # fmt: skip
    plain = drivers["dpo"].main(argv + ["--workdir", str(tmp_path / "plain")])
    flags = ["--microbatches", "2", "--remat", "full", "--logits-chunk", "8", "--scan-layers", "on"]
    lean = drivers["dpo"].main(argv + ["--workdir", str(tmp_path / "lean"), *flags])
    assert [r["step"] for r in lean] == [r["step"] for r in plain] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margin", "logps/chosen", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in lean], [r[key] for r in plain], rtol=2e-5,
                                   atol=1e-5, err_msg=key)  # fmt: skip
    with pytest.raises(ConfigError, match="--microbatches 3: each microbatch"):
        drivers["dpo"].main(argv + ["--workdir", str(tmp_path / "bad"), "--microbatches", "3"])
    assert not (tmp_path / "bad").exists()


def test_ppo_tiny_with_the_reward_model(drivers, sft, reward_model, tmp_path):
    argv = ["--preset", "tiny", "--workdir", str(tmp_path), "--init-from", str(sft[0])]
    rows = drivers["ppo"].main(argv + ["--reward", str(reward_model[0])])
    _check_outputs(tmp_path, rows, 4)
    # Logged at steps 2 and 4: the policy has left the reference (KL 0 before the first update).
    assert all(math.isfinite(r["score"]) and r["kl_exact"] > 1e-7 for r in rows), rows
    assert rows[-1]["kl_coef"] == pytest.approx(0.05)  # fixed coefficient
    assert (tmp_path / "hf").is_dir()


def test_ppo_tiny_with_the_ground_truth_and_adaptive_kl(drivers, sft, tmp_path, monkeypatch):
    calls = []  # (texts, scores) of every host reward call, one per PPO iteration
    make_step = stages_ppo.make_host_reward_step

    def recording(fns, host_reward, **kwargs):
        def reward(texts):
            scores = host_reward(texts)
            calls.append((list(texts), np.asarray(scores)))
            return scores

        return make_step(fns, reward, **kwargs)

    monkeypatch.setattr(stages_ppo, "make_host_reward_step", recording)
    argv = ["--preset", "tiny", "--workdir", str(tmp_path), "--init-from", str(sft[0])]
    rows = drivers["ppo"].main(argv + ["--reward", "ground-truth", "--target-kl", "1.0"])
    _check_outputs(tmp_path, rows, 4)
    # The logged score is the mean VADER compound of that iteration's decoded texts, recomputed
    # with vaderSentiment directly.
    vader = SentimentIntensityAnalyzer()
    assert len(calls) == 4 and all(len(texts) == 16 for texts, _ in calls)
    for row in rows:
        texts, _ = calls[row["step"] - 1]
        want = np.mean([vader.polarity_scores(t)["compound"] for t in texts])
        np.testing.assert_allclose(row["score"], want, rtol=1e-5, atol=1e-6)
    assert rows[-1]["kl_coef_next"] != pytest.approx(0.05)  # adaptive


def test_dpo_tiny_with_lora_adapters(drivers, sft, tmp_path):
    """--lora-rank: the adapters train against the SFT model as base and reference; the run
    writes them in PEFT's format (read back here) and the merged model as hf/."""
    from rlhf_jax import lora
    from rlhf_jax.lora import peft as peft_io

    argv = ["--preset", "tiny", "--workdir", str(tmp_path / "run"), "--init-from", str(sft[0])]
    rows = drivers["dpo"].main(argv + ["--lora-rank", "4", "--lora-alpha", "8"])
    _check_outputs(tmp_path / "run", rows, 30)
    cfg, merged = models.from_pretrained(str(tmp_path / "run" / "hf"))
    adapters, lora_cfg = peft_io.load_peft(str(tmp_path / "run" / "adapter"), cfg)
    assert (lora_cfg.rank, lora_cfg.alpha) == (4, 8.0)
    _, base = models.from_pretrained(str(sft[0] / "hf"))
    want = lora.merge(base, adapters, lora_cfg)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    moved = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(adapters))
    assert moved > 0  # B left zero
    bad = tmp_path / "bad"
    with pytest.raises(ConfigError, match="--lora-targets"):
        drivers["dpo"].main(
            ["--preset", "tiny", "--workdir", str(bad), "--init-from", str(sft[0]),
             "--lora-rank", "4", "--lora-targets", "attention/query"]
        )  # fmt: skip
    assert not bad.exists()


def test_sft_with_qlora(drivers, sft, tmp_path):
    """--lora-rank with --quantize: SFT continues the tiny SFT model with adapters on an int8
    base and hands over a merged hf/ and PEFT adapters (PPO with an int8 base: below; NF4 steps
    in test_qlora.py); --quantize without adapters is refused before any side effect."""
    from rlhf_jax.lora import peft as peft_io

    wd = tmp_path / "sft_qlora"
    argv = ["--preset", "tiny", "--workdir", str(wd), "--init-from", str(sft[0]), "--steps", "12"]
    rows = drivers["sft"].main(argv + ["--lora-rank", "4", "--quantize", "int8"])
    _check_outputs(wd, rows, 12)
    cfg, _ = models.from_pretrained(str(wd / "hf"))
    adapters, _ = peft_io.load_peft(str(wd / "adapter"), cfg)
    assert "layers_0" in adapters
    bad = tmp_path / "bad"
    with pytest.raises(ConfigError, match="--quantize int8 needs --lora-rank"):
        drivers["sft"].main(["--preset", "tiny", "--workdir", str(bad), "--quantize", "int8"])
    assert not bad.exists()


def test_reward_model_and_ppo_with_lora(drivers, sft, reward_model, tmp_path):
    """--lora-rank on the reward model (adapters on the trunk, the head beside them; pairs read
    from the reward-model run) and on PPO against it (QLoRA: an int8 policy base; the critic's
    adapters on the reward model's trunk): each hands over the merged model and the adapters."""
    from rlhf_jax import lora
    from rlhf_jax.lora import peft as peft_io

    rm_dir, ppo_dir = tmp_path / "rm", tmp_path / "ppo"
    argv = ["--preset", "tiny", "--init-from", str(sft[0]), "--steps", "10"]
    pairs_file = str(reward_model[0] / "pairs.jsonl")
    rows = drivers["reward_model"].main(
        argv + ["--workdir", str(rm_dir), "--pairs", pairs_file, "--lora-rank", "4",
                "--lora-dropout", "0.1"]
    )  # fmt: skip
    _check_outputs(rm_dir, rows, 10)
    cfg, merged = handover.load_reward_model(rm_dir)
    adapters, lora_cfg = peft_io.load_peft(str(rm_dir / "adapter"), cfg)
    assert lora_cfg.dropout == pytest.approx(0.1)
    from safetensors.numpy import load_file

    head = load_file(str(rm_dir / "adapter" / "head.safetensors"))
    np.testing.assert_array_equal(head["kernel"], merged["head"]["kernel"])
    _, sft_params = models.from_pretrained(str(sft[0] / "hf"))
    want = lora.merge(sft_params, adapters, lora_cfg)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(merged["transformer"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    ppo_argv = ["--preset", "tiny", "--init-from", str(sft[0]), "--workdir", str(ppo_dir)]
    rows = drivers["ppo"].main(
        ppo_argv + ["--reward", str(rm_dir), "--lora-rank", "4", "--quantize", "int8"]
    )
    _check_outputs(ppo_dir, rows, 4)
    assert all(r["kl_exact"] > 1e-7 for r in rows)  # the adapters moved the policy
    cfg, _ = models.from_pretrained(str(ppo_dir / "hf"))
    assert "layers_0" in peft_io.load_peft(str(ppo_dir / "adapter"), cfg)[0]
    bad = tmp_path / "bad"
    with pytest.raises(ConfigError, match=r"--lora-dropout 1.5: must be in \[0, 1\)"):
        drivers["reward_model"].main(
            argv + ["--workdir", str(bad), "--lora-rank", "4", "--lora-dropout", "1.5"]
        )
    assert not bad.exists()


def test_grpo_sentiment_with_the_reward_model_and_dapo_on_the_ground_truth(
    sft, reward_model, tmp_path
):
    """experiments/grpo.py --task sentiment: RLOO on the reward model (one compiled iteration),
    DAPO with dynamic sampling on VADER computed on the host; both evaluated on held-out
    prompts (ground-truth reward, exact KL to the SFT model)."""
    grpo = driver_scripts.load("grpo")
    argv = ["--preset", "tiny", "--task", "sentiment", "--init-from", str(sft[0])]
    rm_dir = tmp_path / "rm"
    rm_flags = ["--reward", str(reward_model[0]), "--algo", "rloo", "--kl-coef", "0.05"]
    rows = grpo.main(argv + ["--workdir", str(rm_dir), *rm_flags, "--kl-in", "reward"])
    _check_outputs(rm_dir, rows, 6)
    assert {"eval/reward", "eval/kl", "reward_std_in_group"} <= set(rows[-1])
    assert rows[-1]["eval/kl"] > 0 and (rm_dir / "hf").is_dir()
    gt_dir = tmp_path / "gt"
    rows = grpo.main(argv + ["--workdir", str(gt_dir), "--algo", "dapo", "--num-groups", "4"])
    _check_outputs(gt_dir, rows, 6)
    assert 0 <= rows[-1]["groups_kept"] <= 1 and "groups_informative" in rows[-1]
    for bad, flag in [(["--reward", str(tmp_path / "nope")], "--reward"),
                      (["--num-groups", "9"], "--num-groups")]:  # fmt: skip
        out = tmp_path / f"bad{flag}"
        with pytest.raises(ConfigError, match=flag):
            grpo.main(argv + ["--workdir", str(out), "--algo", "dapo", *bad])
        assert not out.exists()
    with pytest.raises(ConfigError, match="--init-from"):
        grpo.main(["--preset", "tiny", "--task", "sentiment", "--workdir", str(tmp_path / "x")])


@pytest.mark.parametrize("name", _NAMES)
def test_bad_configuration_fails_at_start(drivers, sft, name, tmp_path):
    main, wd = drivers[name].main, ["--workdir", str(tmp_path / "run")]
    if name != "sft":
        wd += ["--init-from", str(sft[0])]
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: default, tiny"):
        main(["--preset", "huge", *wd])
    with pytest.raises(ConfigError, match="impossible mesh for 8 devices: .*product is 8"):
        main(["--preset", "tiny", "--mesh", "data=3", *wd])
    with pytest.raises(ConfigError, match="--batch-size: batch size 12 is not divisible"):
        main(["--preset", "tiny", "--batch-size", "12", *wd])
    # The multi-host flags, checked before any connection is tried.
    for bad, message in [
        (["--coordinator-address", "10.0.0.2"], "--coordinator-address '10.0.0.2': must be HOST"),
        (["--distributed", "off", "--process-id", "1"], "--process-id given with --distributed"),
        (["--coordinator-address", "127.0.0.1:9", "--num-processes", "2", "--process-id", "2"],
         r"--process-id 2: must be < --num-processes \(2\)"),
        (["--num-processes", "4"], "num_processes=4 needs a coordinator address"),
        (["--heartbeat-timeout-s", "0"], "--heartbeat-timeout-s 0: must be >= 1"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            main(["--preset", "tiny", *bad, *wd])
    assert not (tmp_path / "run").exists()  # nothing written


def test_resume_with_other_settings_and_cli_errors(drivers, sft, monkeypatch, capsys):
    workdir, argv, _ = sft
    with pytest.raises(ConfigError, match="learning_rate: 0.003 -> 0.5"):
        drivers["sft"].main(argv + ["--learning-rate", "0.5"])
    monkeypatch.setattr(sys, "argv", ["dpo.py", "--preset", "tiny", "--workdir", str(workdir)])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(drivers["dpo"].main)
    assert exit_info.value.code == 2
    assert "error: DPO starts from" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing written; the corrected command then runs
# in the same workdir.


def _pairs_file(path, n, bad_line=None):
    lines = [
        json.dumps({"prompt": f"the film {i}", "chosen": " was great fun", "rejected": " was dull"})
        for i in range(n)
    ]
    if bad_line is not None:
        lines.insert(bad_line - 1, '{"prompt": "a plot", "chosen": " fine"}')  # no "rejected"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {
        "good": _pairs_file(root / "good.jsonl", 20),
        "few": _pairs_file(root / "few.jsonl", 5),
        "bad": _pairs_file(root / "bad.jsonl", 20, bad_line=3),
        "missing": str(root / "missing.jsonl"),
        "nowhere": str(root / "no_such_model"),
    }


def _run_cli(drivers, name, argv, monkeypatch, capsys):
    """The driver as its command line (`run_cli`): (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    try:
        cli.run_cli(drivers[name].main)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


BAD_INPUTS = [
    ("dpo", ["--beta", "-1"], r"--beta -1.0: must be > 0$"),
    ("dpo", ["--label-smoothing", "0.5"], r"--label-smoothing 0.5: must be in \[0, 0.5\)"),
    ("dpo", ["--steps", "0"], r"--steps 0: must be >= 1"),
    ("dpo", ["--warmup-steps", "40"], r"--warmup-steps 40: must be < --steps \(30\)"),
    ("dpo", ["--init-from", "{nowhere}"], r"--init-from .*no_such_model: no such file or folder"),
    ("dpo", ["--pairs", "{missing}"], r"--pairs .*missing.jsonl: no such file or folder"),
    ("dpo", ["--pairs", "{few}"], r"--pairs .*few.jsonl: 5 valid pairs, fewer than the 16"),
    (
        "dpo",
        ["--pairs", "{bad}"],
        r"bad.jsonl:3: missing field 'rejected'.*--on-bad-record skip",
    ),
    ("reward_model", ["--pairs", "{few}"], r"--pairs .*few.jsonl: 5 valid pairs, fewer"),
    ("reward_model", ["--learning-rate", "0"], r"--learning-rate 0.0: must be > 0"),
    ("ppo", ["--kl-coef", "-1"], r"--kl-coef -1.0: must be >= 0"),
    ("ppo", ["--temperature", "0"], r"--temperature 0.0: must be > 0 \(PPO samples\)"),
    ("ppo", ["--reward", "{nowhere}"], r"--reward .*no_such_model: no such file or folder"),
    ("ppo", ["--reward", "{sft}"], r"--reward .*: it is a workdir without reward_model/"),
    ("ppo", ["--target-kl", "0"], r"--target-kl 0.0: must be > 0"),
    ("sft", ["--model", "huge"], r"--model huge: must be a models.PRESETS name"),
    ("sft", ["--max-length", "4096"], r"rows of 4096 tokens exceed the model's context"),
]


@pytest.mark.parametrize(
    "name,argv,message",
    BAD_INPUTS,
    ids=[f"{n}-{a[0]}-{i}" for i, (n, a, _) in enumerate(BAD_INPUTS)],
)
def test_bad_input_is_one_line_before_any_side_effect(
    drivers, sft, pair_files, name, argv, message, tmp_path, monkeypatch, capsys
):
    workdir = tmp_path / "run"
    argv = [a.format(sft=sft[0], **pair_files) for a in argv]
    base = ["--preset", "tiny", "--workdir", str(workdir)]
    if name != "sft" and "--init-from" not in argv:
        base += ["--init-from", str(sft[0])]
    code, _, err = _run_cli(drivers, name, base + argv, monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not workdir.exists()  # no run_config.json, no pairs sampled, no folder


def test_the_corrected_command_runs_in_the_same_workdir(
    drivers, sft, pair_files, tmp_path, monkeypatch, capsys
):
    workdir = tmp_path / "run"
    base = ["--preset", "tiny", "--workdir", str(workdir), "--steps", "2", "--warmup-steps", "0"]
    base += ["--log-every", "1"]
    for wrong in (["--init-from", pair_files["nowhere"]], ["--beta", "-1"]):
        code, _, _ = _run_cli(drivers, "dpo", base + wrong, monkeypatch, capsys)
        assert code == 2 and not workdir.exists()
    base += ["--init-from", str(sft[0])]
    code, _, err = _run_cli(
        drivers, "dpo", base + ["--pairs", pair_files["bad"]], monkeypatch, capsys
    )
    assert code == 2 and "bad.jsonl:3:" in err and not workdir.exists()
    argv = base + ["--pairs", pair_files["bad"], "--on-bad-record", "skip"]
    code, out, err = _run_cli(drivers, "dpo", argv, monkeypatch, capsys)
    assert code == 0, err
    assert "skipped 1 bad lines (lines 3)" in out
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # The DPO hparams check on the host also covers the library path (not only the CLI).
    with pytest.raises(ValueError, match=r"hparams\['beta'\] must be > 0, got -1.0"):
        train.create_train_state(
            {"w": np.zeros(2)}, train.make_optimizer(1e-3), 0, hparams={"beta": -1.0}
        )


def test_custom_loss_example_trains_with_the_dpo_driver(sft, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "custom_loss_example", _ROOT / "experiments" / "custom_loss.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--init-from", str(sft[0]), "--workdir", str(tmp_path), "--steps", "3"]
    rows = example.main(argv + ["--warmup-steps", "0", "--log-every", "1"])
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    stored = json.loads((tmp_path / "run_config.json").read_text())
    assert stored["custom_loss"].endswith("dpop(lam=50.0)")
    out = capsys.readouterr().out
    assert "bandit: dpop lam=0 TV(pi, pi*) = 0.0000" in out and "dpo (" in out
