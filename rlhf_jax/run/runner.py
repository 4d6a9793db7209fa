"""The training loop every driver and stage shares: `fit` (resume, metrics, checkpoints, NaN stop).

state, rows = fit(step, state, loader, workdir=..., steps=..., mesh=mesh)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from rlhf_jax import data as rdata
from rlhf_jax import distributed, paths
from rlhf_jax import sharding as sh
from rlhf_jax.checkpoint import Checkpointer, NonFiniteLossError
from rlhf_jax.run import callbacks as cb
from rlhf_jax.run.metrics_writer import MetricsWriter, read_metrics

logger = logging.getLogger("rlhf_jax.run.runner")

HEALTH_METRICS = ("loss", "grad_norm", "update_norm")  # checked for NaN/Inf at every step


# ----------------------------------------------------------------------------------------------
# The training loop.


def _state_step(state: Any) -> int:
    step = state.get("step") if isinstance(state, Mapping) else getattr(state, "step", None)
    return 0 if step is None else int(jax.device_get(step))


def _first_bad(pending: list[tuple[int, dict[str, Any]]]) -> tuple[int, str, float] | None:
    """(step, metric, value) of the first non-finite health metric among pending steps."""
    values = jax.device_get([m for _, m in pending])
    for (t, _), m in zip(pending, values):
        for name, v in m.items():
            if not math.isfinite(float(v)):
                return t, name, float(v)
    return None


def fit(
    step_fn: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]],
    state: Any,
    batches: Iterable[Any],
    *,
    workdir: str | os.PathLike,
    steps: int,
    log_every: int = 10,
    checkpoint_every: int = 100,
    keep: int = 3,
    mesh: jax.sharding.Mesh | None = None,
    loader: Any = None,
    eval_fn: Callable[[Any, int], Mapping[str, Any]] | None = None,
    eval_every: int | None = None,
    desc: str = "train",
    progress: bool = True,
    jit: bool = True,
    report_to: Sequence[str] = ("tensorboard",),
    callbacks: Sequence[Any] = (),
    policy: Callable[[Any], tuple[Any, Any]] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Trains `state` with `step_fn` up to `steps` updates; resumable, deterministic, NaN-safe.

    - Resume: when `WORKDIR/checkpoints` holds a checkpoint, the state and the data position are
      restored from the latest one (metrics rows after it are dropped), so a run killed at any
      point (SIGKILL included) and rerun with the same command ends bit-identical to an
      uninterrupted one. A complete run returns at once.
    - Compilation: `sharding.compile_step` compiles `step_fn` once for `mesh` (state donated);
      `mesh=None` means all devices on the `data` axis. `jit=False` calls `step_fn` as given (a
      host composite of compiled pieces, e.g. `stages.make_host_reward_step`).
    - Host syncs: none inside the loop except every `log_every` steps, at checkpoints and at eval
      steps. The health metrics (loss, grad_norm, update_norm when present) of EVERY step are kept
      on device and checked at each of these syncs, before any row or checkpoint is written: a
      NaN/Inf raises `checkpoint.NonFiniteLossError` (a FloatingPointError) naming its step, and
      the last checkpoint is the last good one (so `checkpoint_every` need not be a multiple of
      `log_every`).
    - Logging: at each log step (and the last) the metrics of that step are written to
      `WORKDIR/metrics.jsonl` and the reporters of `report_to` (TensorBoard, W&B:
      `MetricsWriter`) as `{"step", "loss", ...}`, and the tqdm bar shows the loss.
      `eval_fn(state, step) -> dict` runs every `eval_every` steps (and at the last), its values
      merged into that step's row as `eval/<name>`. The row of step t holds what update t
      returned (its loss and gradient norms are those of the params before it, as every step
      defines them), and its `eval/` values those of the state after it.
    - Callbacks (`run.callbacks`): `on_eval` at the evaluation steps (also without `eval_fn`;
      what it returns joins the row as `eval/<name>`), `on_log` after each row is written,
      `on_checkpoint` after each checkpoint; on every process.
    - Checkpoints every `checkpoint_every` steps and at the end, with the loader's state; the
      last `keep` are kept.

    Args:
      step_fn: pure `step(state, batch) -> (state, metrics)`; metrics scalars incl. "loss".
      state: the initial state (host or device arrays); also the template for a restore.
      batches: iterator of host batches (numpy; this host's rows).
      workdir: run directory (checkpoints/, metrics.jsonl, tensorboard/).
      steps: total number of updates.
      log_every, checkpoint_every, keep: intervals and the checkpoints kept.
      mesh: the device mesh (default all devices, data-parallel).
      loader: the grain iterator whose position is checkpointed; default `batches` when it has
        `get_state`. A plain iterator is fast-forwarded by the restored step on resume.
      eval_fn, eval_every: periodic evaluation.
      desc, progress: the tqdm bar.
      jit: compile `step_fn` (True) or call it as is (False).
      report_to: where rows go besides metrics.jsonl: "tensorboard", "wandb" (() for none).
      callbacks: objects with hooks `on_log` / `on_eval` / `on_checkpoint` (`run.callbacks`).
      policy: `state -> (model, params)` of the policy the state trains, for callbacks that
        sample (`Event.policy`); None where there is none.
    Returns:
      (final state on `mesh`, every metrics row of the run so far).
    """
    from tqdm.auto import tqdm

    if steps < 0 or log_every < 1 or checkpoint_every < 1:
        raise ValueError("need steps >= 0, log_every >= 1 and checkpoint_every >= 1")
    callbacks = cb.check(callbacks)
    mesh = sh.make_mesh() if mesh is None else mesh
    workdir = paths.as_path(workdir)  # local or cloud (gs://)
    it = iter(batches)
    if loader is None and hasattr(it, "get_state"):
        loader = it
    primary = distributed.is_primary()
    ckpt = Checkpointer(workdir, save_every=checkpoint_every, keep=keep)
    state = sh.shard_state(state, mesh)
    start = _restore(ckpt, state, loader)
    if start is None:
        start = _state_step(state)
    else:
        state, start = start
        if loader is None:
            for _ in range(start):  # a plain iterator: skip what the restored run consumed
                next(it)
    if start > steps:
        logger.warning("%s holds step %d, beyond --steps %d: nothing to do", workdir, start, steps)
    writer = MetricsWriter(workdir, resume_step=start, enabled=primary, report_to=report_to)
    rows = read_metrics(workdir) if primary else []
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not (progress and primary))
    compiled, pending, last_ckpt = None, [], start
    try:
        for t in range(start + 1, steps + 1):
            batch = sh.shard_batch(next(it), mesh)
            if compiled is None:
                compiled = sh.compile_step(step_fn, mesh, state, batch) if jit else step_fn
            state, metrics = compiled(state, batch)
            pending.append((t, {k: metrics[k] for k in HEALTH_METRICS if k in metrics}))
            bar.update(1)
            is_last = t == steps
            do_eval = (eval_fn is not None or callbacks) and (
                is_last or (eval_every and t % eval_every == 0)
            )
            do_log = is_last or do_eval or t % log_every == 0
            do_ckpt = is_last or t % checkpoint_every == 0
            if not (do_log or do_ckpt):
                continue
            bad = _first_bad(pending)
            pending = []
            if bad is not None:
                bt, name, value = bad
                raise NonFiniteLossError(
                    f"non-finite {name} ({value}) at step {bt}; stopped before writing anything "
                    f"after it: the last checkpoint is step {last_ckpt} in {workdir} (lower the "
                    "learning rate or check the data, then rerun to resume from there)"
                )
            event = cb.Event(t, state, workdir, writer, primary, policy_fn=policy)
            if do_log:
                row = {k: v for k, v in jax.device_get(dict(metrics)).items()}
                if do_eval:
                    evals = {} if eval_fn is None else jax.device_get(dict(eval_fn(state, t)))
                    event.evals = evals
                    evals = {**evals, **jax.device_get(cb.run(callbacks, "on_eval", event))}
                    row.update({f"eval/{k}": v for k, v in evals.items()})
                row = writer.write(t, row)
                rows.append(row)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}")
                event.row = row
                cb.run(callbacks, "on_log", event)
            if do_ckpt:
                data_state = None if loader is None else rdata.loader_state(loader)
                ckpt.maybe_save(t, state, data_state=data_state, force=True)
                last_ckpt = t
                if any(callable(getattr(c, "on_checkpoint", None)) for c in callbacks):
                    ckpt.wait()  # the hook sees the checkpoint complete (saves are async)
                    event.checkpoint_dir = paths.as_path(ckpt.directory)
                    cb.run(callbacks, "on_checkpoint", event)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return state, rows


def _restore(ckpt: Any, state: Any, loader: Any) -> tuple[Any, int] | None:
    restored = ckpt.restore_latest(state)
    if restored is None:
        return None
    step, new_state, data_state, _ = restored
    if loader is not None and data_state is not None:
        rdata.restore_loader(loader, data_state)
    return new_state, step
