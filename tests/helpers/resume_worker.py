"""A deterministic toy training run that checkpoints and resumes, for tests/test_checkpoint.py.

    python tests/helpers/resume_worker.py --workdir DIR [--steps 12] [--save-every 3] \
        [--step-sleep 0.3] [--nan-at-step S] [--mesh data=2,fsdp=2,tensor=1]

A real AdamW step on a two-layer MLP with GPT-2 names (sharded by PARTITION_RULES), dropout keyed
by `fold_in(rng, step)`, batches from a reshuffling iterator whose state is saved with each
checkpoint, metrics appended to DIR/metrics.jsonl, final params to DIR/final_params.npz.
Rerunning the same command after a kill resumes from the latest checkpoint (rewinding
metrics.jsonl) and must end bit-identical to an uninterrupted run. `--nan-at-step S` poisons the
batch of step S: the run must stop naming step S with no checkpoint after the last good one.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlhf_jax import checkpoint, sharding  # noqa: E402

D_IN, D_HIDDEN, BATCH = 8, 32, 8
OPTIMIZER = optax.adamw(1e-2)


def init_state(seed):
    """Host (numpy) state: params, AdamW state, step, raw uint32 key."""
    rs = np.random.RandomState(seed)
    params = {
        "layers_0": {
            "mlp": {
                "up": {
                    "kernel": (rs.randn(D_IN, D_HIDDEN) * 0.3).astype(np.float32),
                    "bias": np.zeros(D_HIDDEN, np.float32),
                },
                "down": {
                    "kernel": (rs.randn(D_HIDDEN, 1) * 0.3).astype(np.float32),
                    "bias": np.zeros(1, np.float32),
                },
            }
        }
    }
    zeros = jax.tree.map(np.zeros_like, params)
    opt_state = OPTIMIZER.init(zeros)  # AdamW: count 0, mu = nu = 0
    return {
        "params": params,
        "opt_state": jax.tree.map(np.asarray, opt_state),
        "step": np.int32(0),
        "rng": np.array([0, seed + 1], np.uint32),  # == jax.random.PRNGKey(seed + 1)
    }


def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])

    def loss_fn(params):
        mlp = params["layers_0"]["mlp"]
        h = jax.nn.gelu(batch["x"] @ mlp["up"]["kernel"] + mlp["up"]["bias"])
        h = jnp.where(jax.random.bernoulli(rng, 0.8, h.shape), h / 0.8, 0.0)  # dropout
        pred = (h @ mlp["down"]["kernel"] + mlp["down"]["bias"])[:, 0]
        return jnp.mean((pred - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = OPTIMIZER.update(grads, state["opt_state"], state["params"])
    new = dict(
        state,
        params=optax.apply_updates(state["params"], updates),
        opt_state=opt_state,
        step=state["step"] + 1,
    )
    return new, {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
    }


class Batches:
    """Deterministic data iterator with a saveable state (like grain's): a fixed set of 40
    examples, reshuffled every epoch from (seed, epoch), cut into batches of BATCH."""

    def __init__(self, seed, size=40):
        rs = np.random.RandomState(seed)
        self.x = rs.randn(size, D_IN).astype(np.float32)
        self.y = np.sin(self.x.sum(1)).astype(np.float32)
        self.seed, self.position = seed, 0

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])

    def __iter__(self):
        return self

    def __next__(self):
        per_epoch = len(self.x) // BATCH
        epoch, i = divmod(self.position, per_epoch)
        order = np.random.RandomState([self.seed, epoch]).permutation(len(self.x))
        rows = order[i * BATCH : (i + 1) * BATCH]
        self.position += 1
        return {"x": self.x[rows], "y": self.y[rows]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--nan-at-step", type=int, default=-1)
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    mesh = sharding.make_mesh(**sharding.parse_mesh_spec(args.mesh))
    state = sharding.shard_state(init_state(args.seed), mesh)
    data = Batches(args.seed)
    metrics_path = os.path.join(args.workdir, "metrics.jsonl")
    ckpt = checkpoint.Checkpointer(args.workdir, save_every=args.save_every, keep=args.keep)

    start = 0
    restored = ckpt.restore_latest(state)
    if restored is not None:
        start, state, data_state, extra = restored
        assert extra == {"seed": args.seed}, extra
        data.set_state(data_state)
        checkpoint.rewind_metrics(metrics_path, start)
        print(f"resumed from step {start}", flush=True)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    first = sharding.shard_batch(next(Batches(args.seed)), mesh)
    step_fn = sharding.compile_step(train_step, mesh, state, first)
    try:
        for step in range(start + 1, args.steps + 1):
            batch = next(data)
            if step == args.nan_at_step:
                batch = dict(batch, x=batch["x"] * np.float32("nan"))
            state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
            host = checkpoint.check_finite(step, metrics)  # before anything of this step is saved
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **host}) + "\n")
            ckpt.maybe_save(step, state, data_state=data.get_state(), extra={"seed": args.seed})
            time.sleep(args.step_sleep)
        ckpt.maybe_save(
            args.steps, state, data_state=data.get_state(), extra={"seed": args.seed}, force=True
        )
    finally:
        ckpt.close()
    flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state))[0]
    np.savez(
        os.path.join(args.workdir, "final_params.npz"),
        **{jax.tree_util.keystr(k): v for k, v in flat},
    )
    print("done", flush=True)


if __name__ == "__main__":
    main()
