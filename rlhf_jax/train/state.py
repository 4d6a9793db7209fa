"""Train state pytree, the AdamW optimizer factory, and the update helper shared by every step.

A `TrainState` carries everything a pure step `step(state, batch) -> (state, metrics)` reads or
writes: trained params and their optax state, the step counter, the run's base key, frozen params
(e.g. the DPO reference model) and float32 hyperparameters. Hyperparameters live in the state (not
in the step's closure) so that a sweep is `jax.vmap` over stacked states, e.g. DPO's beta sweep as
one `jit(vmap(step, in_axes=(0, None)))`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any  # a nested dict of arrays


@flax.struct.dataclass
class TrainState:
    """State of one trained model.

    Attributes:
      params: trained parameters (pytree).
      opt_state: the optax state of `params`.
      step: int32 scalar, number of updates applied so far.
      rng: the run's base PRNG key; a step uses `jax.random.fold_in(rng, step)`, never `rng` itself.
      frozen: pytree of parameters that are read but never trained (the DPO reference params);
        None when unused.
      hparams: dict of float32 scalars read by the step (e.g. {"beta": 0.1}); {} when unused.
    """

    params: Any
    opt_state: Any
    step: Any  # int32 []
    rng: Any  # PRNG key
    frozen: Any = None
    hparams: Any = dataclasses.field(default_factory=dict)


def unalias(tree: Any, other: Any) -> Any:
    """Copies the leaves of `tree` that are the very same arrays as leaves of `other`.

    A donated state must not hold one buffer twice (policy params and a reference initialised
    from them, for instance): donation would invalidate both.
    """
    seen = {id(x) for x in jax.tree.leaves(other)}
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if id(x) in seen else x, tree)


def as_key(rng: Any) -> jax.Array:
    """An int seed becomes a raw uint32 key `PRNGKey(seed)` (plain data: checkpoints and shards
    like any array); a key (typed or raw) is returned as is."""
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    return rng


# Ranges of the hyperparameters the library's steps read from `TrainState.hparams`: checked on
# the host when a state is created, because inside the step they are traced values.
HPARAM_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "beta": (lambda v: v > 0, "> 0"),
    "alpha": (lambda v: v >= 0, ">= 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "kl_coef": (lambda v: v >= 0, ">= 0"),
}


def check_hparams(hparams: Mapping[str, Any]) -> None:
    """Raises ValueError for a non-finite hyperparameter, or one outside `HPARAM_RANGES` (every
    entry of a stacked sweep is checked). Traced values cannot be checked and pass.

    Raises:
      ValueError: "hparams['beta'] must be > 0, got -1.0".
    """
    for name, value in hparams.items():
        try:
            values = np.asarray(value, np.float64).ravel()
        except jax.errors.TracerArrayConversionError:
            continue
        bad = [v for v in values if not math.isfinite(v)]
        if not bad and name in HPARAM_RANGES:
            ok, what = HPARAM_RANGES[name]
            bad = [v for v in values if not ok(v)]
        else:
            what = "finite"
        if bad:
            raise ValueError(f"hparams[{name!r}] must be {what}, got {float(bad[0])!r}")


def create_train_state(
    params: Params,
    optimizer: optax.GradientTransformation,
    rng: Any,
    *,
    frozen: Params | None = None,
    hparams: Mapping[str, Any] | None = None,
) -> TrainState:
    """Builds a `TrainState` at step 0.

    Args:
      params: parameters to train.
      optimizer: the optax transformation the step builder also closes over.
      rng: int seed or PRNG key.
      frozen: parameters read but not trained (DPO: the reference params). Leaves that are the
        same arrays as leaves of `params` are copied so that the state can be donated.
      hparams: float hyperparameters read by the step; stored as float32 scalars. Checked
        on the host (`check_hparams`): e.g. beta must be > 0.
    Returns:
      The state with `step == 0`.
    Raises:
      ValueError: a hyperparameter out of its range, named.
    """
    check_hparams(hparams or {})
    if frozen is not None:
        frozen = unalias(frozen, params)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in (hparams or {}).items()}
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=as_key(rng),
        frozen=frozen,
        hparams=hp,
    )


def make_optimizer(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    decay: str = "linear",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a warmup-then-decay learning-rate schedule.

    The schedule rises linearly from 0 over `warmup_steps`, then stays constant when `total_steps`
    is None, else decays to 0 at `total_steps` (`decay` "linear" or "cosine"). Weight decay applies
    to parameters of rank >= 2 only (kernels and embeddings; biases and LayerNorm scales are left
    alone, as in the Hugging Face Trainer).

    Args:
      learning_rate: peak learning rate.
      warmup_steps: linear warmup length.
      total_steps: length of the whole schedule, or None for a constant rate after warmup.
      decay: "linear" or "cosine" decay after warmup (only when `total_steps` is set).
      weight_decay: decoupled weight decay coefficient (Loshchilov & Hutter 2019).
      max_grad_norm: clip the global gradient norm to this value; None disables clipping.
      b1, b2, eps: Adam moments' decay rates and epsilon.
    Returns:
      An optax GradientTransformation.
    """
    if decay not in ("linear", "cosine"):
        raise ValueError(f"decay must be 'linear' or 'cosine', got {decay!r}")
    if total_steps is not None and total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    if total_steps is None:
        after = optax.constant_schedule(learning_rate)
    elif decay == "linear":
        after = optax.linear_schedule(learning_rate, 0.0, total_steps - warmup_steps)
    else:
        after = optax.cosine_decay_schedule(learning_rate, total_steps - warmup_steps)
    if warmup_steps > 0:
        warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
        schedule = optax.join_schedules([warmup, after], [warmup_steps])
    else:
        schedule = after
    adamw = optax.adamw(
        schedule,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=lambda p: jax.tree.map(lambda x: jnp.ndim(x) >= 2, p),
    )
    if max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


def apply_gradients(
    optimizer: optax.GradientTransformation,
    params: Params,
    opt_state: Any,
    grads: Params,
    *,
    norm_groups: Mapping[str, Any] | None = None,
) -> tuple[Params, Any, dict[str, jax.Array]]:
    """One optimizer update; returns new params, new opt state, and grad/update global norms.

    `grad_norm` is the norm of the raw gradient (before clipping), `update_norm` the norm of the
    update actually added to the params; each `norm_groups` entry (name -> selector of a part of
    the tree) adds `<name>_grad_norm` and `<name>_update_norm` of that part.
    """
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    norms = {"grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates)}
    for name, select in (norm_groups or {}).items():
        norms[f"{name}_grad_norm"] = optax.tree.norm(select(grads))
        norms[f"{name}_update_norm"] = optax.tree.norm(select(updates))
    return params, opt_state, norms


def rng_for_step(state: Any) -> jax.Array:
    """The step's key: `fold_in(state.rng, state.step)` (deterministic and resumable)."""
    return jax.random.fold_in(state.rng, state.step)


def stack_states(states: list[Any]) -> Any:
    """Stacks states leaf-wise along a new leading axis (for `jax.vmap` over a sweep)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(state: Any, i: int) -> Any:
    """The i-th state of a stacked sweep."""
    return jax.tree.map(lambda x: x[i], state)
