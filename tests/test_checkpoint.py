"""Tests for rlhf_jax.checkpoint: interval/keep policy, bitwise restore into shardings, data state,
the non-finite stop, and SIGKILL-resume of a real training loop (tests/helpers/resume_worker.py).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, sharding

WORKER = Path(__file__).parent / "helpers" / "resume_worker.py"
REPO = Path(__file__).parent.parent


def _host(tree):
    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(leaf, tree)


def _assert_bitwise_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(_host(a)), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def _toy_state(mesh):
    rs = np.random.RandomState(0)
    params = {
        "layers_0": {"mlp": {"up": {"kernel": rs.randn(8, 16).astype(np.float32)}}},
        "final_norm": {"scale": np.ones(8, np.float32)},
    }
    state = {
        "params": params,
        "opt_state": {"mu": jax.tree.map(np.zeros_like, params), "count": np.int32(0)},
        "step": np.int32(0),
        "rng": jax.random.PRNGKey(3),
        "key": jax.random.key(4),  # a typed key array as well
    }
    return sharding.shard_state(state, mesh)


def _toy_step(state, batch):
    k = state["params"]["layers_0"]["mlp"]["up"]["kernel"]
    noise = jax.random.normal(jax.random.fold_in(state["rng"], state["step"]), k.shape)
    new_k = k * 0.5 + noise * 1e-3 + batch["x"].mean()
    params = {
        "layers_0": {"mlp": {"up": {"kernel": new_k}}},
        "final_norm": state["params"]["final_norm"],
    }
    opt = {"mu": jax.tree.map(lambda m: m + 1.0, state["opt_state"]["mu"]), "count": state["step"]}
    new = dict(state, params=params, opt_state=opt, step=state["step"] + 1)
    return new, {"loss": jnp.sum(new_k), "grad_norm": jnp.float32(1.0)}


def test_save_every_keep_last_and_restore_bitwise(tmp_path):
    mesh = sharding.make_mesh(2, 2, 2)
    state = _toy_state(mesh)
    batch = {"x": np.ones((8, 2), np.float32)}
    step = sharding.compile_step(_toy_step, mesh, state, batch)
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=2, keep=2)
    assert ckpt.restore_latest(state) is None and ckpt.latest_step() is None
    snapshots = {}
    for i in range(1, 6):
        state, _ = step(state, batch)  # donates: saves must not read the donated buffers late
        snapshots[i] = _host(state)
        assert ckpt.maybe_save(i, state, data_state={"position": i}) == (i % 2 == 0)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4]
    template = _toy_state(mesh)
    got_step, got, data_state, extra = ckpt.restore_latest(template)
    assert (got_step, data_state, extra) == (4, {"position": 4}, {})
    _assert_bitwise_equal(got, snapshots[4])
    assert jax.tree.map(lambda x: x.sharding, got) == jax.tree.map(lambda x: x.sharding, template)

    assert ckpt.maybe_save(5, state, force=True)
    assert not ckpt.maybe_save(5, state, force=True)  # already saved: skipped
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]

    # A new process's view: restore into an abstract target (eval_shape + state_shardings).
    abstract = jax.eval_shape(lambda: template)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        sharding.state_shardings(mesh, abstract),
    )
    with checkpoint.Checkpointer(tmp_path, save_every=2, keep=2) as again:
        got_step, got, data_state, _ = again.restore_latest(abstract)
    assert (got_step, data_state) == (5, None)
    _assert_bitwise_equal(got, snapshots[5])
    spec = got["params"]["layers_0"]["mlp"]["up"]["kernel"].sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")


@pytest.mark.parametrize(
    "data_state",
    [b'{"next_index": 7}\x00\xff', {"next_index": 7, "epochs": [1, 2]}, "opaque", None],
)
def test_data_state_and_extra_round_trip(tmp_path, data_state):
    state = {"w": np.arange(4, dtype=np.float32)}
    with checkpoint.Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.maybe_save(1, state, data_state=data_state, extra={"kl_coef": 0.05, "name": "x"})
        step, restored, got_data, extra = ckpt.restore_latest(state)
    assert step == 1 and got_data == data_state and extra == {"kl_coef": 0.05, "name": "x"}
    np.testing.assert_array_equal(restored["w"], state["w"])


def test_unserialisable_data_state_fails_at_save(tmp_path):
    with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
        with pytest.raises(TypeError, match="JSON-serialisable or bytes"):
            ckpt.maybe_save(1, {"w": np.zeros(2)}, data_state=object())
        assert ckpt.latest_step() is None


def test_check_finite_names_the_step(tmp_path):
    got = checkpoint.check_finite(3, {"loss": jnp.float32(0.5), "grad_norm": np.float32(2.0)})
    assert got == {"loss": 0.5, "grad_norm": 2.0}
    with pytest.raises(checkpoint.NonFiniteLossError, match=r"non-finite loss \(nan\) at step 7"):
        checkpoint.check_finite(7, {"loss": jnp.float32(jnp.nan)})
    with pytest.raises(checkpoint.NonFiniteLossError, match="grad_norm .* at step 9"):
        checkpoint.check_finite(jnp.int32(9), {"loss": 1.0, "grad_norm": jnp.float32(jnp.inf)})
    # maybe_save checks metrics before writing anything of that step.
    with checkpoint.Checkpointer(tmp_path, save_every=2) as ckpt:
        assert ckpt.maybe_save(2, {"w": np.ones(2)}, metrics={"loss": 1.0})
        with pytest.raises(checkpoint.NonFiniteLossError, match="step 4"):
            ckpt.maybe_save(4, {"w": np.ones(2)}, metrics={"loss": float("inf")})
        ckpt.wait()
        assert ckpt.all_steps() == [2]


def test_rewind_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert checkpoint.rewind_metrics(path, 3) == 0
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
    path.write_text("\n".join(lines) + '\n{"step": 7, "lo')  # the last line cut by a kill
    assert checkpoint.rewind_metrics(path, 4) == 4
    assert path.read_text() == "\n".join(lines[:4]) + "\n"


def test_half_written_checkpoint_is_ignored(tmp_path):
    state = {"w": np.arange(3, dtype=np.float32)}
    with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.maybe_save(1, state)
    # What a kill during the write of step 2 leaves: orbax's temporary directory, never renamed.
    partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\x00" * 10)
    with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.latest_step() == 1
        step, restored, _, _ = ckpt.restore_latest(state)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], state["w"])


# --------------------------------------------------------------------------------------------
# A real loop in a subprocess: SIGKILL and resume, NaN stop


def _env():
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
        PYTHONPATH=str(REPO),
    )
    return env


def _start(workdir, *args):
    cmd = [sys.executable, str(WORKER), "--workdir", str(workdir), *args]
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"worker timed out\n{out}\n{err[-3000:]}")
    return proc.returncode, out, err


def _metric_steps(workdir):
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def _finished_checkpoints(workdir):
    root = Path(workdir) / "checkpoints"
    return [p.name for p in root.iterdir() if p.name.isdigit()] if root.exists() else []


def test_sigkill_resume_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _start(straight)  # uninterrupted run, concurrently
    victim = _start(killed, "--step-sleep", "0.4")
    deadline = time.time() + 120
    while not (_finished_checkpoints(killed) and _metric_steps(killed) >= 7):
        assert victim.poll() is None, victim.communicate()
        assert time.time() < deadline, "the run never got past step 7"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert _metric_steps(killed) < 12

    rc, out, err = _finish(_start(killed))  # the same command again
    assert rc == 0, err[-3000:]
    resumed_from = int(out.split("resumed from step ")[1].split()[0])
    assert resumed_from in (3, 6, 9)
    rc, _, err = _finish(reference)
    assert rc == 0, err[-3000:]

    assert (killed / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
    want, got = np.load(straight / "final_params.npz"), np.load(killed / "final_params.npz")
    assert sorted(want.files) == sorted(got.files) and len(want.files) >= 10
    for name in want.files:
        assert want[name].tobytes() == got[name].tobytes(), name


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    rc, out, err = _finish(_start(tmp_path, "--nan-at-step", "8", "--save-every", "3"))
    assert rc != 0
    assert "NonFiniteLossError" in err and "non-finite loss (nan) at step 8" in err
    assert sorted(_finished_checkpoints(tmp_path), key=int) == ["3", "6"]
    assert _metric_steps(tmp_path) == 7
    with checkpoint.Checkpointer(tmp_path, save_every=3) as ckpt:
        assert ckpt.latest_step() == 6
