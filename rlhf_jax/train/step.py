"""The one step contract: `make_step(loss_fn, optimizer)` builds every training step.

A loss function takes the trained params, a batch, and keyword-only the state's frozen params
and hyperparameters:

    loss_fn(params, batch, *, frozen, hparams) -> (loss, metrics)

(`metrics` a dict of scalars; "loss" is added when missing). A loss that also declares a
keyword `rng` receives a key of its own per step, `fold_in(fold_in(state.rng, state.step),
RNG_LOSS)` (LoRA dropout, `lora.lora_loss`); evaluation passes none. The step built from it is

    step(state, batch) -> (state, metrics)

for any state with `params`, `opt_state` and `step` fields (a `TrainState`): gradient of the loss
w.r.t. `state.params`, one optimizer update, `step + 1`, and the metrics plus `grad_norm` (raw
gradient) and `update_norm` (the update applied). SFT, reward model, the DPO family,
Unlikelihood, the PPO minibatch update and the bandit learners are all this step with their own
loss, so a user's loss written to the contract trains the same way:

    def my_loss(params, batch, *, frozen, hparams):
        ...
        return loss, {"my_metric": m}

    step = train.make_step(my_loss, optimizer)      # un-jitted; compile with sharding
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.train.state import apply_gradients

Batch = Any
Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]
Step = Callable[[Any, Batch], tuple[Any, Metrics]]
RNG_LOSS = 0x6C6F7373  # the fold_in purpose of a loss's per-step key ("loss")


def takes_rng(loss_fn: Callable[..., Any]) -> bool:
    """Whether `loss_fn` declares a keyword `rng` (then `make_step` passes it a key)."""
    try:
        return "rng" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def loss_key(state: Any) -> jax.Array:
    """The key `make_step` passes a loss that takes `rng`: `fold_in(fold_in(state.rng,
    state.step), RNG_LOSS)`."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), RNG_LOSS)


def make_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    norm_groups: Mapping[str, Callable[[Any], Any]] | None = None,
    microbatches: int = 1,
) -> Step:
    """Builds the pure step `step(state, batch) -> (state, metrics)` (un-jitted).

    With `microbatches` K > 1 the batch (every leaf's leading axis, divisible by K) is split
    into K consecutive microbatches inside the one compiled step: a `lax.scan` sums their
    gradients in float32 and the optimizer applies the mean, so only one microbatch's
    activations are alive at a time. That is the full batch's gradient exactly when the loss is
    a mean over rows with equal weight (the DPO family, the reward model, PPO's minibatches);
    a token-mean loss weights each microbatch's tokens by their own count instead. Metrics are
    the microbatches' means; a keyed loss gets `fold_in(key, i)` for microbatch i.

    Args:
      loss_fn: `loss_fn(params, batch, *, frozen, hparams) -> (loss, metrics)`; it receives
        `state.frozen` and `state.hparams` (None / {} when the state has none).
      optimizer: the optax transformation `state.opt_state` belongs to.
      norm_groups: optional name -> selector of a part of the params tree (e.g. the policy and
        the value halves of PPO's joint params); adds `<name>_grad_norm` and `<name>_update_norm`.
    Returns:
      The step; metrics are the loss's plus grad_norm and update_norm.
    """

    keyed = takes_rng(loss_fn)
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")

    def step(state: Any, batch: Batch) -> tuple[Any, Metrics]:
        frozen = getattr(state, "frozen", None)
        hparams = getattr(state, "hparams", None) or {}

        def grads_of(params, batch, key):
            extra = {"rng": key} if keyed else {}

            def objective(params):
                loss, metrics = loss_fn(params, batch, frozen=frozen, hparams=hparams, **extra)
                return loss, {"loss": loss, **metrics}

            return jax.grad(objective, has_aux=True)(params)

        key = loss_key(state) if keyed else None
        if microbatches == 1:
            grads, metrics = grads_of(state.params, batch, key)
        else:
            grads, metrics = _accumulated(grads_of, state.params, batch, key, microbatches)
        params, opt_state, norms = apply_gradients(
            optimizer, state.params, state.opt_state, grads, norm_groups=norm_groups
        )
        state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return state, {**metrics, **norms}

    return step


def _accumulated(grads_of, params, batch, key, k: int):
    """(mean gradient, mean metrics) over `k` consecutive microbatches of `batch` (a scan)."""

    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % k:
            raise ValueError(
                f"microbatches={k} must divide every batch leaf's leading axis; got shape {x.shape}"
            )
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    parts = jax.tree.map(split, batch)

    def body(acc, xs):
        i, part = xs
        sub = None if key is None else jax.random.fold_in(key, i)
        grads, metrics = grads_of(params, part, sub)
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        return acc, metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    total, metrics = jax.lax.scan(body, zeros, (jnp.arange(k), parts))
    grads = jax.tree.map(lambda t, p: (t / k).astype(jnp.result_type(p)), total, params)
    return grads, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def make_eval(loss_fn: LossFn) -> Callable[[Any, Batch], Metrics]:
    """`eval_fn(state, batch) -> metrics`: the loss's metrics (and "loss") without an update."""

    def eval_fn(state: Any, batch: Batch) -> Metrics:
        frozen = getattr(state, "frozen", None)
        hparams = getattr(state, "hparams", None) or {}
        loss, metrics = loss_fn(state.params, batch, frozen=frozen, hparams=hparams)
        return {"loss": loss, **metrics}

    return eval_fn


def paired_optimizer(
    first: optax.GradientTransformation, second: optax.GradientTransformation
) -> optax.GradientTransformation:
    """One transformation over a pair of param trees `(a, b)`: `first` updates `a` and `second`
    updates `b` (e.g. PPO's policy and critic with their own learning rates). Its state is the
    pair of the two states, so `state[0]` / `state[1]` are each optimizer's own."""

    def init(params):
        return (first.init(params[0]), second.init(params[1]))

    def update(grads, state, params=None):
        pa, pb = (None, None) if params is None else params
        ua, sa = first.update(grads[0], state[0], pa)
        ub, sb = second.update(grads[1], state[1], pb)
        return (ua, ub), (sa, sb)

    return optax.GradientTransformation(init, update)
