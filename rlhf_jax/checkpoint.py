"""Orbax checkpoints of a train state with the data iterator state, and the non-finite-loss stop.

One checkpoint = one orbax step directory `WORKDIR/checkpoints/<step>/` with three items:
`state` (the train-state pytree, each host writing only its own shards), `data` (every process's
data-iterator state, e.g. grain's `get_state()`, gathered and written once) and `extra` (a small
JSON dict from the primary host: config, KL coefficient, ...). Orbax writes into a temporary
directory and renames it when complete, so a run killed at any moment (SIGKILL included) leaves
either a whole checkpoint or none that `restore_latest` would pick up. The workdir may be a cloud
URL (gs://...): Orbax writes there through TensorStore, and the commit is its own (on GCS a
marker file written last instead of a rename).

Frozen parameters are not written: a `TrainState`'s `frozen` (a DPO reference, a LoRA base) and a
`PPOState`'s `ref_params` / `reward_params`, wherever they sit in the state (also inside a sweep).
They never change, so `restore_latest` takes them from its `target_state`, the initial state of
the rerun command; a checkpoint holds only what training changes (a LoRA run: the adapters and
their optimizer state).

A driver's loop, in the order that keeps "no checkpoint after the last good step":

    ckpt = Checkpointer(workdir, save_every=cfg.checkpoint_every)
    restored = ckpt.restore_latest(state)                # None on a fresh run
    if restored:
        start, state, data_state, _ = restored
        loader.set_state(data_state)
        rewind_metrics(workdir / "metrics.jsonl", start)
    for step in range(start + 1, cfg.steps + 1):
        state, metrics = train_step(state, next(loader))
        ckpt.maybe_save(step, state, data_state=loader.get_state(), metrics=metrics)
    ckpt.maybe_save(cfg.steps, state, data_state=loader.get_state(), force=True)
    ckpt.close()
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax import paths

_ITEMS = ("state", "data", "extra")
FROZEN_FIELDS = ("frozen", "ref_params", "reward_params")
SHARED_KEY = "shared"  # a sweep state's frozen fields held once (`sweeps.stack_sweep`)


def _frozen_names(tree: Any) -> list[str]:
    if not (dataclasses.is_dataclass(tree) and hasattr(tree, "replace")):
        return []
    return [f for f in FROZEN_FIELDS if getattr(tree, f, None) is not None]


def without_frozen(state: Any) -> Any:
    """`state` with its frozen parts (`FROZEN_FIELDS` of train states, at any depth of dicts, and
    a sweep's `"shared"` entry) set to None: what a checkpoint holds."""
    if names := _frozen_names(state):
        return state.replace(**{f: None for f in names})
    if isinstance(state, Mapping):
        return {k: None if k == SHARED_KEY else without_frozen(v) for k, v in state.items()}
    return state


def with_frozen(restored: Any, template: Any) -> Any:
    """`restored` (a `without_frozen` state) with the frozen parts of `template` put back."""
    if names := _frozen_names(template):
        return restored.replace(**{f: getattr(template, f) for f in names})
    if isinstance(template, Mapping):
        return {
            k: v if k == SHARED_KEY else with_frozen(restored[k], v) for k, v in template.items()
        }
    return restored


class NonFiniteLossError(FloatingPointError):
    """A loss (or gradient norm) became NaN or Inf; the run stops before saving that step."""


def check_finite(
    step: Any, metrics: Mapping[str, Any], keys: tuple[str, ...] = ("loss", "grad_norm")
) -> dict[str, float]:
    """Fetches scalar metrics to the host and raises if any of `keys` is NaN or Inf.

    Call it before `Checkpointer.maybe_save` of the same step (or pass `metrics=` to it) so that
    no state of a diverged step is ever written.

    Args:
      step: the step number the metrics belong to (as logged).
      metrics: dict of scalars (device or host).
      keys: the metrics that must be finite; those absent from `metrics` are skipped.
    Returns:
      The scalar metrics as Python floats (ready for logging).
    Raises:
      NonFiniteLossError: naming the metric, its value and the step.
    """
    host = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    for key in keys:
        if key in host and not math.isfinite(host[key]):
            raise NonFiniteLossError(
                f"non-finite {key} ({host[key]}) at step {int(step)}: stopping the run; nothing "
                f"from step {int(step)} is saved, so the latest checkpoint is the last good one. "
                "Lower the learning rate or inspect that step's batch, then rerun to resume."
            )
    return host


def rewind_metrics(path: str | os.PathLike, step: int) -> int:
    """Drops the lines of a metrics JSONL file whose "step" is after `step` (resume after a kill).

    Only the primary host should call it (it is the one that writes the file).

    Args:
      path: the metrics.jsonl file (missing is fine).
      step: the restored step; lines with "step" <= step are kept.
    Returns:
      The number of lines kept.
    """
    path = paths.as_path(path)
    if not path.exists():
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            break
        if int(record.get("step", -1)) > step:
            break
        kept.append(line if line.endswith(b"\n") else line + b"\n")
    paths.write_bytes_atomic(path, b"".join(kept))  # the old or the new file, local or cloud
    return len(kept)


def _encode_data_state(value: Any) -> dict:
    if value is None:
        return {"kind": "none"}
    if isinstance(value, bytes | bytearray):
        return {"kind": "bytes", "value": base64.b64encode(bytes(value)).decode("ascii")}
    try:
        json.dumps(value)
    except TypeError as e:
        raise TypeError(f"data_state must be JSON-serialisable or bytes: {e}") from None
    return {"kind": "json", "value": value}


def _decode_data_state(record: Mapping[str, Any]) -> Any:
    if record["kind"] == "bytes":
        return base64.b64decode(record["value"])
    return record.get("value")


def _allgather_json(value: Any) -> list:
    """Every process's JSON-able `value`, in process order (a no-op list on one process)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32)))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(buf))  # [processes, max bytes]
    return [json.loads(gathered[i, : sizes[i, 0]].tobytes()) for i in range(len(gathered))]


def _abstract(x: Any) -> Any:
    """Restore target of one leaf: a sharded jax.Array becomes a ShapeDtypeStruct with its
    sharding; ShapeDtypeStructs and host arrays are used as they are."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


class Checkpointer:
    """Saves every `save_every` steps (and on `force`), keeps the last `keep`, restores the latest.

    Args:
      workdir: the run directory; checkpoints go to `workdir/checkpoints`.
      save_every: save when `step % save_every == 0`.
      keep: number of most recent checkpoints kept.
      async_save: write in a background thread after the device-to-host copy (the state may be
        donated to the next step right after `maybe_save` returns).
    """

    def __init__(
        self, workdir: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True
    ):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1")
        self.save_every = save_every
        self.directory = paths.as_str(paths.as_path(workdir) / "checkpoints")  # or a gs:// URL
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the interval is decided in maybe_save
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # remove half-written ones left by a killed run
            create=True,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "extra": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=_ITEMS, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete (or in-flight, from this process) checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the kept checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def maybe_save(
        self,
        step: Any,
        state: Any,
        *,
        data_state: Any = None,
        extra: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` as step `step` if it is a multiple of `save_every` (or `force`).

        Every process must call it with the same `step` (orbax saves collectively).

        Args:
          step: number of updates in `state` (the value the loop logs).
          state: the train-state pytree (sharded jax.Arrays).
          data_state: this process's data-iterator state (JSON-able or bytes), or None.
          extra: small JSON dict to keep with the checkpoint (the primary host's is written).
          metrics: if given, `check_finite(step, metrics)` runs first and raises on NaN/Inf.
          force: save even off the interval (end of training); a step already saved is skipped.
        Returns:
          True if a save was started.
        """
        step = int(step)
        if not force and step % self.save_every:
            return False
        if metrics is not None:
            check_finite(step, metrics)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        data = {
            "process_count": jax.process_count(),
            "states": _allgather_json(_encode_data_state(data_state)),
        }
        extra = dict(extra or {})
        json.dumps(extra)  # fail here, not in the writer thread
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(without_frozen(state)),
            data=ocp.args.JsonSave(data),
            extra=ocp.args.JsonSave(extra),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def restore_latest(self, target_state: Any) -> tuple[int, Any, Any, dict] | None:
        """Restores the newest checkpoint into the shapes, dtypes and shardings of `target_state`.

        Args:
          target_state: a state like the saved one: concrete sharded arrays, or ShapeDtypeStructs
            with shardings (e.g. `jax.eval_shape` output with `state_shardings` attached). Its
            frozen parts are the restored state's (they are not in the checkpoint).
        Returns:
          (step, state, data_state, extra), with this process's data state, or None when the
          directory holds no checkpoint.
        """
        self._manager.wait_until_finished()
        step = self._manager.latest_step()
        if step is None:
            return None
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(
                    jax.tree.map(_abstract, without_frozen(target_state))
                ),
                data=ocp.args.JsonRestore(),
                extra=ocp.args.JsonRestore(),
            ),
        )
        states = restored["data"]["states"]
        me, count = jax.process_index(), jax.process_count()
        if len(states) == count:
            data_state = _decode_data_state(states[me])
        elif all(s == states[0] for s in states):
            data_state = _decode_data_state(states[0])
        else:
            raise ValueError(
                f"checkpoint step {step} holds data states of {len(states)} processes but this "
                f"run has {count}; resume with the same number of processes"
            )
        state = with_frozen(restored["state"], target_state)
        return step, state, data_state, dict(restored["extra"] or {})

    def wait(self) -> None:
        """Blocks until in-flight saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for in-flight saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
