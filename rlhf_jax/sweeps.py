"""A sweep of a hyperparameter held in the train state as ONE program: `vmap(step)` over stacked
member states sharing each batch (DPO's beta, PPO's kl_coef, Unlikelihood's alpha).

    states = stack_sweep([create_train_state(p, opt, 0, hparams={"beta": b}) for b in betas])
    step = sweep_step(train.make_dpo_step(model, opt))      # compile it like any step
    state, rows = runner.fit(step, states, loader, ...)     # metrics "loss/0", "loss/1", ...

The sweep state is `{"step": int32 [], "members": the states stacked leaf-wise}`, with a scalar
step so that `runner.fit` logs and checkpoints it like any run. Frozen parts equal in every member
(a DPO reference, a LoRA base, PPO's reference and reward model: `checkpoint.FROZEN_FIELDS`) are
held once, under `"shared"`, and every member reads the same arrays: a sweep of N runs holds one
reference, not N.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.checkpoint import FROZEN_FIELDS
from rlhf_jax.train.state import stack_states, unstack_state

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def flatten_sweep_metrics(metrics: Mapping[str, jax.Array]) -> Metrics:
    """[S]-shaped metrics of a vmapped step -> scalars "name/i", plus `loss` (mean over the
    sweep: a NaN anywhere shows) and the max of grad_norm / update_norm (the health metrics)."""
    out: Metrics = {}
    for name, value in metrics.items():
        for i in range(value.shape[0]):
            out[f"{name}/{i}"] = value[i]
    out["loss"] = jnp.mean(metrics["loss"])
    for name in ("grad_norm", "update_norm"):
        if name in metrics:
            out[name] = jnp.max(metrics[name])
    return out


def _same(a: Any, b: Any) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        x is y or (x.shape == y.shape and bool(jnp.array_equal(x, y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def stack_sweep(states: Sequence[Any]) -> dict[str, Any]:
    """A sweep state: `{"step": int32 [], "members": the states stacked leaf-wise}`, plus
    `"shared"`: the frozen fields (`checkpoint.FROZEN_FIELDS`) equal in every member, held once.

    The members are stacked by `train.stack_states`; the scalar step is the sweep's own update
    count (what `runner.fit` reads and checkpoints).
    """
    states = list(states)
    shared = {}
    for name in FROZEN_FIELDS:
        values = [getattr(s, name, None) for s in states]
        if values[0] is not None and all(_same(values[0], v) for v in values[1:]):
            shared[name] = values[0]
    if shared:
        states = [s.replace(**{name: None for name in shared}) for s in states]
    out = {"step": jnp.zeros((), jnp.int32), "members": stack_states(states)}
    if shared:
        out["shared"] = shared
    return out


def sweep_member(sweep: Mapping[str, Any], i: int) -> Any:
    """The i-th member state of a sweep state (with the shared frozen fields)."""
    member = unstack_state(sweep["members"], i)
    return member.replace(**sweep["shared"]) if sweep.get("shared") else member


def sweep_step(
    step: Callable[[Any, Batch], tuple[Any, Metrics]],
) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], Metrics]]:
    """`vmap(step)` over the members of a sweep state (`stack_sweep`) sharing one batch and the
    shared frozen fields, with scalar metrics (`flatten_sweep_metrics`); compile it like any
    step."""

    def run(sweep: dict[str, Any], batch: Batch) -> tuple[dict[str, Any], Metrics]:
        shared = sweep.get("shared") or {}

        def one(member, batch):
            new, metrics = step(member.replace(**shared) if shared else member, batch)
            return (new.replace(**{k: None for k in shared}) if shared else new), metrics

        members, metrics = jax.vmap(one, in_axes=(0, None))(sweep["members"], batch)
        out = {"step": sweep["step"] + 1, "members": members}
        if shared:
            out["shared"] = shared
        return out, flatten_sweep_metrics(metrics)

    return run


def time_sweep(
    sweep: Callable[[Any, Batch], tuple[Any, Metrics]],
    member: Callable[[Any, Batch], tuple[Any, Metrics]],
    states: Mapping[str, Any],
    batches: Sequence[Batch],
    *,
    place: Callable[[Any], Any] = lambda s: s,
) -> dict[str, float]:
    """Wall time of the sweep as one program against the same runs one by one.

    Runs `len(batches) - 1` timed steps (after one warm-up step on `batches[0]`, so compilation
    and first-call costs are excluded) of `sweep` on the sweep state `states`, then of `member`
    on each member state in turn, and compares the resulting params (the two paths compute the
    same runs; floating-point summation order may differ).

    Args:
      sweep: compiled `sweep_step(step)` (it may donate its state).
      member: compiled `step` for one member state.
      states: the sweep state (`stack_sweep`), not modified.
      batches: >= 2 batches, already placed for the compiled functions.
      place: puts a state where the compiled functions want it (fresh buffers, e.g.
        `sharding.shard_state`).
    Returns:
      {"steps", "members", "vmapped_s", "one_by_one_s", "speedup", "max_param_diff"}.
    """

    def run(fn, state):
        state, metrics = fn(place(state), batches[0])  # warm-up
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for batch in batches[1:]:
            state, metrics = fn(state, batch)
        jax.block_until_ready((state, metrics))
        return time.perf_counter() - start, state

    n = jax.tree.leaves(states["members"])[0].shape[0]
    t_sweep, swept = run(sweep, states)
    t_one, diff = 0.0, 0.0
    for i in range(n):
        dt, single = run(member, sweep_member(states, i))
        t_one += dt
        other = sweep_member(swept, i)
        diffs = jax.tree.leaves(
            jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), single.params, other.params)
        )
        diff = max(diff, *diffs)
    return {
        "steps": len(batches) - 1,
        "members": n,
        "vmapped_s": t_sweep,
        "one_by_one_s": t_one,
        "speedup": t_one / t_sweep,
        "max_param_diff": diff,
    }
