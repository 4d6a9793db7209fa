"""Two local processes joined by `jax.distributed` on 127.0.0.1 run a sharded training step on
per-host data shards; they must agree with a plain single-process run, and a checkpoint written
by both restores on both (tests/helpers/multihost_worker.py does the per-process work).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import toy_steps

WORKER = Path(__file__).parent / "helpers" / "multihost_worker.py"
REPO = Path(__file__).parent.parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(builder, mesh, out_dir, *, devices_per_process=2, timeout=150, extra=()):
    """Starts two workers, waits for both (killing both on timeout); returns their results."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={devices_per_process}"
            " --xla_backend_optimization_level=0"  # compile faster; numerics are compared to 1e-5
        ),
        PYTHONPATH=str(REPO),
    )
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                f"--builder={builder}",
                f"--coordinator=127.0.0.1:{port}",
                "--num-processes=2",
                f"--process-id={i}",
                f"--mesh={mesh}",
                f"--out={out_dir}",
                *extra,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            logs.append(err[-4000:])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(
            "multi-host workers timed out:\n" + "\n".join(p.communicate()[1] for p in procs)
        )
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} failed:\n{logs[i]}"
    return [dict(np.load(Path(out_dir) / f"result_{i}.npz")) for i in range(2)]


def test_two_processes_match_single_process(tmp_path):
    results = run_two_processes(
        "helpers.toy_steps:build_toy",
        "data=1,fsdp=2,tensor=2",  # fsdp spans the two hosts, tensor within each
        tmp_path,
        extra=[f"--checkpoint-dir={tmp_path / 'ckpt'}"],
    )
    # Each host fed its own half of the batch.
    np.testing.assert_array_equal(results[0]["rows"], np.arange(4))
    np.testing.assert_array_equal(results[1]["rows"], np.arange(4, 8))

    # The reference: plain single-device jit over the whole batch.
    state, step_fn, batches = toy_steps.build_toy()
    step = jax.jit(step_fn)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    want = {f"state/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in flat}

    for r in results:
        np.testing.assert_allclose(r["metrics/loss"], losses, rtol=0, atol=1e-5)
        assert set(want) <= set(r)
        for key, value in want.items():
            np.testing.assert_allclose(r[key], value, rtol=0, atol=1e-5, err_msg=key)
        for key in want:  # both hosts hold the same global state
            assert r[key].tobytes() == results[0][key].tobytes(), key
        assert int(r["checkpoint/step"]) == len(batches)
        assert bool(r["checkpoint/state_equal"]) and bool(r["checkpoint/extra_equal"])
        assert bool(r["checkpoint/data_state_own"])  # each host got its own data state back
    assert sorted(os.listdir(tmp_path / "ckpt" / "checkpoints")) == ["3"]
