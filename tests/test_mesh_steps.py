"""The real SFT, reward, DPO and PPO steps give the same numbers on a device mesh as on one device.

For each step (tests/helpers/mesh_step_builders.py: a tiny GPT-2 with d_model 32, d_ff 128,
vocab 64, so fsdp=4 and tensor=2 split its weights; AdamW from `make_optimizer`), three steps of
plain single-device `jax.jit` are the reference, and three steps on the meshes (8,1,1), (2,4,1),
(2,2,2) through `sharding.shard_state` / `shard_batch` / `compile_step` must give the same metrics
(loss included) per step and the same final state (params and optimizer moments) to 1e-5.
PPO is checked twice: the update on fixed synthetic rollouts on every mesh, and the fused step
(generation, reward model, scoring, update) on (2,2,2).

Each step type runs in its own subprocess (tests/helpers/mesh_step_runner.py), all started at
once, with `--xla_backend_optimization_level=0` for the reference and the meshes alike: compiling
18 programs dominates the cost, and unoptimised CPU code halves it (the arithmetic stays float32).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses compiling 18 programs of 5 step types

RUNNER = Path(__file__).parent / "helpers" / "mesh_step_runner.py"
REPO = Path(__file__).parent.parent
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
CASES = [(step, mesh) for step in ("sft", "reward", "dpo", "ppo_update") for mesh in MESHES] + [
    ("ppo_step", (2, 2, 2))
]
TOL = 1e-5
TIMEOUT_S = 600  # per runner, on a loaded 2-core machine; all runners share the cores


def _mesh_key(mesh):
    return "mesh_" + "_".join(map(str, mesh))


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Starts one runner per step type this session selected; `runs(step)` waits for its result."""
    wanted = {}
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "step" in params:
            wanted.setdefault(params["step"], []).append(params["mesh"])
    out_dir = tmp_path_factory.mktemp("mesh_steps")
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"),
        PYTHONPATH=str(REPO),
    )
    procs = {}
    for step, meshes in wanted.items():
        cmd = [sys.executable, str(RUNNER), f"--step={step}", f"--out={out_dir / step}.npz"]
        cmd += ["--meshes", *sorted({",".join(map(str, m)) for m in meshes})]
        procs[step] = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}

    def get(step):
        if step not in results:
            proc = procs[step]
            try:
                _, err = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"mesh runner for {step} timed out:\n{proc.communicate()[1][-4000:]}")
            assert proc.returncode == 0, f"mesh runner for {step} failed:\n{err[-6000:]}"
            results[step] = dict(np.load(out_dir / f"{step}.npz"))
        return results[step]

    yield get
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _section(result, prefix):
    return {k[len(prefix) + 1 :]: v for k, v in result.items() if k.startswith(prefix + "/")}


@pytest.mark.parametrize(
    ("step", "mesh"), CASES, ids=[f"{s}-{'x'.join(map(str, m))}" for s, m in CASES]
)
def test_mesh_matches_single_device(runs, step, mesh):
    result = runs(step)
    want, got = _section(result, "single"), _section(result, _mesh_key(mesh))
    info = json.loads(str(got.pop("info")))
    moved = json.loads(str(want.pop("info")))["moved"]

    # Three real updates: the state moves far more than the tolerance.
    assert moved > 100 * TOL
    losses = want["metrics/loss"]
    assert len(losses) == 3 and np.all(np.isfinite(losses)) and np.ptp(losses) > 100 * TOL

    # Every metric of every step, then every leaf of the final state.
    assert set(got) == set(want)
    diffs = {}
    for key in sorted(want):
        np.testing.assert_allclose(got[key], want[key], rtol=TOL, atol=TOL, err_msg=key)
        diffs[key] = float(np.max(np.abs(got[key].astype(np.float64) - want[key])))
    state_diff = max(v for k, v in diffs.items() if k.startswith("state/"))
    print(
        f"\n{step} mesh {mesh}: max|d loss| {diffs['metrics/loss']:.2e}, max|d metric| "
        f"{max(v for k, v in diffs.items() if k.startswith('metrics/')):.2e}, max|d state| "
        f"{state_diff:.2e} (state moved {moved:.2e}); runner cpu {info['cpu_s']:.1f} s"
    )

    # The compiled step donated its input, kept the layouts, and replicated the metrics.
    assert info["donated"] and info["layouts_ok"] and info["metrics_replicated"]

    # The partition rules really split the weights: a leaf is split across devices exactly where
    # its spec names a mesh axis of size > 1, and the MLP input kernel [D, F] = [32, 128] (params,
    # Adam moments, frozen reference) is split over fsdp by rows and over tensor by columns.
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh))
    used = set()
    for path, spec in info["specs"].items():
        axes = {a for a in ("data", "fsdp", "tensor") if f"'{a}'" in spec}
        big = {a for a in axes if sizes[a] > 1}
        used |= big
        shard = info["shard_shapes"][path]
        full = got[f"state/{path}"].shape
        assert (tuple(shard) != full) == bool(big), (path, spec, shard, full)
    assert used == {a for a in ("fsdp", "tensor") if sizes[a] > 1}
    kernels = [p for p in info["specs"] if p.endswith("['layers_0']['mlp']['up']['kernel']")]
    assert len(kernels) >= 3
    for path in kernels:
        assert info["shard_shapes"][path] == [32 // sizes["fsdp"], 128 // sizes["tensor"]], path
