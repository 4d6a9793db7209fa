"""rlhf_jax.run.cli: parse_config (presets and overrides), write_run_config (resume only with
the same run), resolve_mesh and check_batch on the 8 forced CPU devices (conftest)."""

import dataclasses
import json

import jax
import pytest
from helpers.run_inputs import RunConfig

from rlhf_jax.errors import ConfigError
from rlhf_jax.run import checks, cli, handover


def test_parse_config_presets_and_overrides():
    presets = {"default": RunConfig(), "tiny": RunConfig(steps=2)}
    assert cli.parse_config(RunConfig, presets, []) == RunConfig()
    cfg = cli.parse_config(RunConfig, presets, ["--preset", "tiny", "--learning-rate", "0.5"])
    assert cfg == RunConfig(steps=2, learning_rate=0.5)
    cfg = cli.parse_config(RunConfig, presets, ["--steps", "3", "--preset=tiny"])
    assert cfg == RunConfig(steps=3)
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*default, tiny"):
        cli.parse_config(RunConfig, presets, ["--preset", "huge"])


def test_write_run_config_allows_steps_and_names_other_differences(tmp_path):
    cli.write_run_config(tmp_path, RunConfig())
    stored = json.loads((tmp_path / handover.RUN_CONFIG).read_text())
    assert stored == {**dataclasses.asdict(RunConfig()), "betas": [0.1, 1.0]}
    cli.write_run_config(tmp_path, RunConfig())
    cli.write_run_config(tmp_path, RunConfig(steps=20, workdir="elsewhere"))
    with pytest.raises(ConfigError, match=r"betas: \[0.1, 1.0\] -> \[0.2\].*learning_rate"):
        cli.write_run_config(tmp_path, RunConfig(learning_rate=1.0, betas=(0.2,)))


def test_resolve_mesh_and_check_batch():
    assert jax.device_count() == 8
    mesh = checks.resolve_mesh("data=2,fsdp=4")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(checks.resolve_mesh("tensor=2").shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ConfigError, match="impossible mesh for 8 devices: .*product is 8"):
        checks.resolve_mesh("data=3")
    with pytest.raises(ConfigError, match="impossible mesh for 8 devices: bad mesh spec"):
        checks.resolve_mesh("model=8")
    assert checks.check_batch(16, mesh) == 16
    with pytest.raises(ConfigError, match="--batch-size: batch size 12 .* multiple of 8"):
        checks.check_batch(12, mesh)
