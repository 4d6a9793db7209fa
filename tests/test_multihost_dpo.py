"""Two local processes joined by `jax.distributed` on 127.0.0.1 run the real DPO step sharded over
both hosts' devices and agree with a single-process run.

Each process (tests/helpers/multihost_worker.py with the builder
`helpers.mesh_step_builders:build_dpo`) has 4 CPU devices; the mesh data=2,fsdp=2,tensor=2 spans
the 8 global devices (data across the hosts, fsdp and tensor within each). Each host feeds only
its own rows of the global batch (`sharding.process_batch_rows` + `shard_batch`), runs three
steps of `make_dpo_step` compiled by `compile_step` and writes its metrics and the gathered final
state. The reference is three steps of plain single-device `jax.jit` in this process. A lost peer
aborts the survivor (10 s heartbeat), and the test kills both on its timeout: it never hangs.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import mesh_step_builders

pytestmark = pytest.mark.slow  # two jax.distributed processes

WORKER = Path(__file__).parent / "helpers" / "multihost_worker.py"
REPO = Path(__file__).parent.parent
BUILDER = "helpers.mesh_step_builders:build_dpo"
MESH = "data=2,fsdp=2,tensor=2"
DEVICES_PER_PROCESS = 4
TIMEOUT_S = 240  # both workers compile on a shared 2-core machine
TOL = 1e-5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(out_dir):
    port = _free_port()
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
            " --xla_backend_optimization_level=0"  # compile faster; same float32 semantics
        ),
        PYTHONPATH=str(REPO),
    )
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                f"--builder={BUILDER}",
                f"--coordinator=127.0.0.1:{port}",
                "--num-processes=2",
                f"--process-id={i}",
                f"--mesh={MESH}",
                f"--out={out_dir}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _wait(procs):
    """Waits for both workers; kills both if either runs past the timeout or fails."""
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[1])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        errs = "\n---\n".join(p.communicate()[1][-3000:] for p in procs)
        pytest.fail(f"multi-host DPO workers timed out after {TIMEOUT_S} s:\n{errs}")
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, (
            f"process {i} failed (rc {proc.returncode}):\n{logs[i][-6000:]}"
        )


def test_two_process_dpo_matches_single_process(tmp_path):
    procs = _start_workers(tmp_path)
    try:
        # The single-process reference, computed while the workers start up and compile.
        metrics, state = mesh_step_builders.run_single_device(mesh_step_builders.build_dpo())
    finally:
        _wait(procs)
    results = [dict(np.load(tmp_path / f"result_{i}.npz")) for i in range(2)]

    # Each host fed its own half of the global batch of 8 pairs.
    rows = [r["rows"] for r in results]
    assert [len(r) for r in rows] == [4, 4]
    np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(8))

    want_metrics = {f"metrics/{k}": np.array([m[k] for m in metrics]) for k in metrics[0]}
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    want_state = {f"state/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in leaves}
    losses = want_metrics["metrics/loss"]
    assert np.ptp(losses) > 100 * TOL  # three real updates

    for i, r in enumerate(results):
        assert set(want_metrics) <= set(r) and set(want_state) <= set(r)
        for key, value in {**want_metrics, **want_state}.items():
            np.testing.assert_allclose(r[key], value, rtol=TOL, atol=TOL, err_msg=f"{i}: {key}")
        for key in want_state:  # both hosts hold the very same global state
            assert r[key].tobytes() == results[0][key].tobytes(), key
    d_loss = np.max(np.abs(results[0]["metrics/loss"] - losses))
    d_state = max(np.max(np.abs(results[0][k] - v)) for k, v in want_state.items())
    print(f"\n2-process DPO vs 1 process: max|d loss| {d_loss:.2e}, max|d state| {d_state:.2e}")
