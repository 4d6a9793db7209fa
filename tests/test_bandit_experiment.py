"""Smoke test of experiments/bandit.py (the `make demo` job) on a tiny setting."""

import csv
import dataclasses
import importlib.util
import math
import pathlib

import jax
import numpy as np
import pytest

from rlhf_jax.errors import ConfigError

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bandit.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bandit_experiment", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_presets_and_overrides(script):
    assert script._cli([]) == script.Config()
    got = script._cli(["--preset", "tiny", "--steps", "7", "--workdir", "w"])
    assert got == dataclasses.replace(script.PRESETS["tiny"], steps=7, workdir="w")
    assert script._cli(["--betas", "0.2", "3"]) == script.Config(betas=(0.2, 3.0))
    for argv, message in [
        (["--betas", "0.5", "-1"], r"--betas \(0.5, -1.0\): must be > 0"),
        (["--label-noise", "0.5"], r"--label-noise 0.5: must be in \[0, 0.5\)"),
        (["--methods", "dpo", "sft"], r"--methods \('dpo', 'sft'\): must be one of dpo, "),
        (["--preset", "huge"], "unknown preset 'huge'; choose one of: default, tiny"),
    ]:
        with pytest.raises(ConfigError, match=message):
            script._cli(argv)


def test_main_writes_table_and_plot(script, tmp_path, capsys):
    tiny = script.PRESETS["tiny"]
    config = dataclasses.replace(tiny, workdir=str(tmp_path), methods=("dpo", "exact_pg"), steps=20)
    rows = script.main(config)

    names = ("π_ref", *config.methods)
    assert [(r["beta"], r["method"]) for r in rows] == [(b, m) for b in config.betas for m in names]
    for r in rows:
        assert math.isfinite(r["gap_mean"]) and r["gap_mean"] >= -1e-5  # β log Z is the maximum
    # π_ref's row against NumPy: TV(π_ref, π*) per seed with π* ∝ π_ref exp(r / β) (Eq. 4).
    bandits, _, _ = script._setup(config, jax.random.key(config.seed))
    ref = np.asarray(bandits.ref_probs, np.float64)  # [seeds, X, K]
    rewards = np.asarray(bandits.rewards, np.float64)
    by_key = {(r["beta"], r["method"]): r for r in rows}
    for beta in config.betas:
        target = ref * np.exp(rewards / beta)
        target /= target.sum(-1, keepdims=True)
        tv = 0.5 * np.abs(ref - target).sum(-1).mean(-1)  # [seeds]
        row = by_key[(beta, "π_ref")]
        np.testing.assert_allclose(
            [row["tv_mean"], row["tv_std"]], [tv.mean(), tv.std()], rtol=1e-4
        )
        # 20 steps of the exact gradient of Eq. 3 move every bandit's policy towards π*.
        assert by_key[(beta, "exact_pg")]["tv_mean"] < 0.8 * tv.mean()
    with open(tmp_path / "results.csv") as f:
        written = list(csv.DictReader(f))
    assert [(float(r["beta"]), r["method"]) for r in written] == [
        (r["beta"], r["method"]) for r in rows
    ]
    for got, want in zip(written, rows):
        assert math.isclose(float(got["tv_mean"]), want["tv_mean"], rel_tol=1e-6)
    png = (tmp_path / "policies.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    out = capsys.readouterr().out
    assert str(tmp_path / "results.csv") in out and str(tmp_path / "policies.png") in out
