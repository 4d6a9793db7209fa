"""One process of a multi-host run on 127.0.0.1, for tests/test_multihost.py (and its copies).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
    python tests/helpers/multihost_worker.py --builder helpers.toy_steps:build_toy \
        --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I \
        --mesh data=1,fsdp=2,tensor=2 --out DIR [--checkpoint-dir DIR]

`--builder module:function` names a function (importable with the repository root and tests/ on
sys.path) returning `(state, step_fn, batches)`: a host state pytree identical on every process,
a pure `step(state, batch) -> (state, metrics)`, and a list of GLOBAL host batches. Each process
keeps only its rows (`sharding.process_batch_rows`), builds global arrays with
`sharding.shard_batch`, runs the steps compiled by `sharding.compile_step`, and writes
DIR/result_<I>.npz: the gathered final state (keys `state/<path>`) and the metrics per step
(keys `metrics/<name>`). With `--checkpoint-dir`, it also saves the final state with a
per-process data state, restores it and checks both round trips (keys `checkpoint/*`).

A lost peer makes the survivor abort after ~10 s (heartbeat timeout), so a test that starts two
of these with a timeout never hangs.
"""

import argparse
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import checkpoint, distributed, sharding  # noqa: E402


def _load(dotted):
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _flat(tree, prefix):
    def host(x):
        if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}/{jax.tree_util.keystr(p)}": host(x) for p, x in leaves}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--builder", required=True, help="module:function")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint-dir", default=None)
    args = p.parse_args()

    distributed.init_distributed(
        args.coordinator,
        args.num_processes,
        args.process_id,
        heartbeat_timeout_s=10,
        initialization_timeout_s=60,
    )
    from jax.experimental import multihost_utils

    assert jax.process_count() == args.num_processes, jax.process_count()
    host_state, step_fn, batches = _load(args.builder)()
    mesh = sharding.make_mesh(**sharding.parse_mesh_spec(args.mesh))
    state = sharding.shard_state(host_state, mesh)
    global_size = len(jax.tree.leaves(batches[0])[0])
    rows = sharding.process_batch_rows(global_size, mesh)
    local = [jax.tree.map(lambda x: np.asarray(x)[rows], b) for b in batches]

    step = sharding.compile_step(step_fn, mesh, state, sharding.shard_batch(local[0], mesh))
    metrics = []
    for batch in local:
        state, m = step(state, sharding.shard_batch(batch, mesh))
        metrics.append({k: float(v) for k, v in m.items()})

    out = {
        "rows": rows,
        **{f"metrics/{k}": np.array([m[k] for m in metrics]) for k in metrics[0]},
        **_flat(multihost_utils.process_allgather(state, tiled=True), "state"),
    }
    if args.checkpoint_dir:
        saved = _flat(multihost_utils.process_allgather(state, tiled=True), "state")
        my_data = {"process": jax.process_index(), "rows": rows.tolist()}
        with checkpoint.Checkpointer(args.checkpoint_dir, save_every=1) as ckpt:
            ckpt.maybe_save(len(batches), state, data_state=my_data, extra={"n": len(batches)})
        with checkpoint.Checkpointer(args.checkpoint_dir, save_every=1) as ckpt:
            template = sharding.shard_state(host_state, mesh)
            got_step, restored, data_state, extra = ckpt.restore_latest(template)
        back = _flat(multihost_utils.process_allgather(restored, tiled=True), "state")
        same = all(saved[k].tobytes() == back[k].tobytes() for k in saved)
        out["checkpoint/step"] = np.array(got_step)
        out["checkpoint/state_equal"] = np.array(same)
        out["checkpoint/data_state_own"] = np.array(data_state == my_data)
        out["checkpoint/extra_equal"] = np.array(extra == {"n": len(batches)})
    np.savez(os.path.join(args.out, f"result_{args.process_id}.npz"), **out)
    multihost_utils.sync_global_devices("done")
    print("done", flush=True)


if __name__ == "__main__":
    main()
