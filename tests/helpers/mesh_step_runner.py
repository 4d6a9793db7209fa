"""Runs one training step type on one device and on device meshes, for tests/test_mesh_steps.py.

    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
    JAX_PLATFORMS=cpu python tests/helpers/mesh_step_runner.py --step dpo \
        --meshes 8,1,1 2,4,1 2,2,2 --out RESULT.npz

`--step` names a builder of tests/helpers/mesh_step_builders.py. The reference is plain
single-device `jax.jit`; each mesh run goes through `sharding.shard_state`, `shard_batch` and
`compile_step` (donated state, AOT). RESULT.npz holds, per run `R` ("single" or "mesh_D_F_T"):
`R/metrics/<name>` (one value per step), `R/state/<keystr>` (the final state, gathered) and, for
meshes, `R/info`: a JSON string with the partition specs of the state, the shape of each leaf's
first device shard, the donation and metric-replication checks and timings.

It runs in its own process so that the compiler flags above (unoptimised CPU code: half the
compile time, still float32 arithmetic) apply; jaxtyping's runtime checker is installed on
rlhf_jax as under pytest.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]

import jaxtyping  # noqa: E402

jaxtyping.install_import_hook(["rlhf_jax"], "beartype.beartype")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from helpers import mesh_step_builders  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from rlhf_jax import sharding  # noqa: E402


def _flat(tree, prefix):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in leaves}


def _metrics(prefix, metrics):
    return {f"{prefix}/metrics/{k}": np.array([m[k] for m in metrics]) for k in metrics[0]}


def run_mesh(shape, built):
    host_state, step_fn, batches = built
    t0 = time.process_time()
    mesh = sharding.make_mesh(*shape)
    specs = sharding.param_partition_specs(host_state, mesh)
    spec_by_path = {
        jax.tree_util.keystr(p): str(tuple(s))
        for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[
            0
        ]
    }
    state = sharding.shard_state(host_state, mesh)
    shard_shapes = {
        jax.tree_util.keystr(p): list(x.addressable_shards[0].data.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    layouts_ok = jax.tree.map(lambda x: x.sharding, state) == sharding.state_shardings(mesh, state)
    step = sharding.compile_step(step_fn, mesh, state, batches[0])
    t_compile = time.process_time() - t0
    metrics, donated, replicated = [], None, True
    for batch in batches:
        before = state
        state, m = step(state, sharding.shard_batch(batch, mesh))
        if donated is None:
            donated = all(x.is_deleted() for x in jax.tree.leaves(before))
        replicated &= all(v.sharding.is_fully_replicated for v in m.values())
        metrics.append({k: float(v) for k, v in m.items()})
    layouts_kept = jax.tree.map(lambda x: x.sharding, state) == sharding.state_shardings(
        mesh, state
    )
    info = {
        "specs": spec_by_path,
        "shard_shapes": shard_shapes,
        "layouts_ok": bool(layouts_ok and layouts_kept),
        "donated": bool(donated),
        "metrics_replicated": bool(replicated),
        "cpu_s": time.process_time() - t0,
        "compile_cpu_s": t_compile,
    }
    prefix = "mesh_" + "_".join(map(str, shape))
    out = {**_metrics(prefix, metrics), **_flat(state, f"{prefix}/state")}
    out[f"{prefix}/info"] = np.array(json.dumps(info))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--step", required=True, choices=mesh_step_builders.STEP_NAMES)
    p.add_argument("--meshes", nargs="+", default=["8,1,1", "2,4,1", "2,2,2"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    assert jax.device_count() == 8, jax.devices()

    built = mesh_step_builders.build(args.step)
    t0 = time.process_time()
    metrics, state = mesh_step_builders.run_single_device(built)
    out = {**_metrics("single", metrics), **_flat(state, "single/state")}
    moved = max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(jax.tree.leaves(built[0]), jax.tree.leaves(state))
        if np.issubdtype(np.asarray(a).dtype, np.floating)
    )  # how far three steps move the float state: the comparisons must be far tighter
    info = {"cpu_s": time.process_time() - t0, "moved": moved}
    out["single/info"] = np.array(json.dumps(info))
    for spec in args.meshes:
        out.update(run_mesh(tuple(int(s) for s in spec.split(",")), built))
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
