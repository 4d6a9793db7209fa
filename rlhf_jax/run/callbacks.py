"""Hooks into `runner.fit` for scripts: run code at each log, evaluation and checkpoint without
copying the loop.

    class Watch(callbacks.Callback):
        def on_eval(self, event):
            model, params = event.policy()          # the policy after update event.step
            return {"my_metric": score(model, params)}   # logged as eval/my_metric

    stages.train_sft(..., callbacks=[Watch()])       # or runner.fit(..., callbacks=[Watch()])

A callback is any object with some of the methods `on_log`, `on_eval`, `on_checkpoint` (each taking
one `Event`); `Callback` is a base with all three doing nothing. They run on EVERY process of a
multi-host run, in the order given, so they may run sharded computations (a generation over the
mesh); writing is for `event.primary` (or through `event.writer`, which writes on the primary only).

When each hook runs, at a step t that `fit` syncs with the host:
- `on_eval`: at the evaluation steps (every `eval_every` and the last), after `eval_fn`; a returned
  mapping of scalars is merged into that step's row as `eval/<name>` (`event.evals` holds
  `eval_fn`'s values so far).
- `on_log`: after the row of step t is written (`event.row`: metrics.jsonl's row, python numbers).
- `on_checkpoint`: after the checkpoint of step t is saved and complete (`event.checkpoint_dir`;
  the loop waits for the asynchronous save when some callback has this hook).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

HOOKS = ("on_log", "on_eval", "on_checkpoint")


@dataclasses.dataclass
class Event:
    """What a hook sees at step `step`.

    Attributes:
      step: the update just done (its state is `state`).
      state: the training state after update `step` (on the mesh).
      workdir: the run directory (an `epath.Path`, local or cloud).
      writer: the run's `MetricsWriter` (`write_samples`; primary only, a no-op elsewhere).
      primary: whether this process writes shared files.
      row: `on_log`: the row written for this step.
      evals: `on_eval`: `eval_fn`'s values at this step (without the `eval/` prefix).
      checkpoint_dir: `on_checkpoint`: the folder holding the run's checkpoints.
    """

    step: int
    state: Any
    workdir: Any
    writer: Any
    primary: bool
    row: Mapping[str, Any] | None = None
    evals: Mapping[str, Any] | None = None
    checkpoint_dir: Any = None
    policy_fn: Callable[[Any], Any] | None = None

    def policy(self) -> tuple[Any, Any] | None:
        """(model, params) of the policy in `state`, for sampling (`sampling.generate`), or None
        where the stage has none (a reward model, a sweep's stacked members)."""
        return None if self.policy_fn is None else self.policy_fn(self.state)


class Callback:
    """A callback whose hooks do nothing; subclass it and override the ones you need."""

    def on_log(self, event: Event) -> None:
        pass

    def on_eval(self, event: Event) -> Mapping[str, Any] | None:
        return None

    def on_checkpoint(self, event: Event) -> None:
        pass


def check(callbacks: Sequence[Any]) -> tuple[Any, ...]:
    """`callbacks` as a tuple, each with at least one hook (a ValueError names the one without)."""
    out = tuple(callbacks)
    for i, cb in enumerate(out):
        if not any(callable(getattr(cb, h, None)) for h in HOOKS):
            raise ValueError(f"callbacks[{i}] ({cb!r}) has none of the hooks {', '.join(HOOKS)}")
    return out


def run(callbacks: Sequence[Any], hook: str, event: Event) -> dict[str, Any]:
    """Calls `hook` of every callback that has it; returns the merged mappings they returned."""
    out: dict[str, Any] = {}
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if callable(fn):
            got = fn(event)
            if got:
                out.update(got)
    return out
