"""Bradley-Terry reward-model step (seed eq. 2).

Batch (contract "Preference batch", right-padded, int32 [B, T], same T for both sides):
  chosen_tokens, chosen_attention_mask, rejected_tokens, rejected_attention_mask
  (the *_loss_mask keys may be present; the reward model does not read them)
  optional "margin" [B] float32: a per-pair margin m_b in -log sigmoid(r_c - r_r - m_b)
  (Llama-2's preference-strength margin), added to the builder's constant margin.
Chosen and rejected go through ONE forward on their concatenation [2B, T].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import LossFn, make_step

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def concat_pairs(batch: Batch, name: str) -> jax.Array:
    """`concatenate([batch["chosen_"+name], batch["rejected_"+name]])` along the batch axis."""
    return jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)


def make_reward_loss(reward_model: nn.Module, *, margin: float = 0.0) -> LossFn:
    """Builds `loss_fn(params, batch, *, frozen, hparams) -> (loss, metrics)` (train.make_step's
    contract) for the Bradley-Terry reward model.

    `L = mean_b -log sigmoid(r(x, y_w) - r(x, y_l) - margin_b)` (seed eq. 2; the margin as in
    Touvron et al. 2023, eq. 2). Metrics: loss, accuracy (fraction with r_c > r_r), margin (mean
    r_c - r_r), rewards/chosen, rewards/rejected (means).
    """

    def loss_fn(
        params: Any, batch: Batch, *, frozen=None, hparams=None
    ) -> tuple[jax.Array, Metrics]:
        b = batch["chosen_tokens"].shape[0]
        scores = reward_model.apply(
            {"params": params},
            concat_pairs(batch, "tokens"),
            concat_pairs(batch, "attention_mask"),
        )  # [2B]
        r_c, r_r = scores[:b], scores[b:]  # [B], [B]
        m = margin
        if "margin" in batch:
            m = m + jnp.asarray(batch["margin"], jnp.float32)  # [B]
        loss = jnp.mean(losses.bradley_terry_loss(r_c, r_r, margin=m))
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean((r_c > r_r).astype(jnp.float32)),
            "margin": jnp.mean(r_c - r_r),
            "rewards/chosen": jnp.mean(r_c),
            "rewards/rejected": jnp.mean(r_r),
        }
        return loss, metrics

    return loss_fn


def make_reward_step(
    reward_model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    margin: float = 0.0,
    microbatches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure reward-model step `step(state, batch) -> (state, metrics)` (un-jitted).

    Args:
      reward_model: a `RewardModel` (`apply(params, tokens, mask) -> scores[B]`).
      optimizer: the optax transformation `state.opt_state` belongs to.
      margin: constant margin subtracted from r_c - r_r inside the sigmoid.
      microbatches: gradient accumulation over that many microbatches (`train.make_step`).
    Returns:
      The step (`train.make_step` of `make_reward_loss`); metrics: loss, grad_norm, update_norm,
      accuracy, margin, rewards/chosen, rewards/rejected.
    """
    loss = make_reward_loss(reward_model, margin=margin)
    return make_step(loss, optimizer, microbatches=microbatches)


def make_reward_eval(reward_model: nn.Module, *, margin: float = 0.0) -> Callable:
    """`eval_fn(params, batch) -> metrics`: the reward-model metrics without an update."""
    loss_fn = make_reward_loss(reward_model, margin=margin)
    return lambda params, batch: loss_fn(params, batch)[1]
