"""Unlikelihood training and Preferred-FT on preference pairs: the baselines of the DPO paper
(Rafailov et al. 2023, Sec. 6), as `train.make_step` losses.

Batch: a preference batch (see `train.dpo`). State: a `TrainState` with `hparams["alpha"]`, the
weight of the unlikelihood term (0: Preferred-FT, supervised fine-tuning on the chosen
completions), so an alpha sweep is `vmap` over stacked states.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.train.dpo import pair_logps
from rlhf_jax.train.reward import concat_pairs
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import LossFn, make_step

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def make_unlikelihood_loss(model: nn.Module) -> LossFn:
    """`loss_fn(params, batch, *, frozen, hparams) -> (loss, metrics)` on a preference batch.

    `L = mean_b [-mean_{t in y_w} log p_t - alpha * mean_{t in y_l} log(1 - p_t)]`
    (`losses.unlikelihood_loss`; Welleck et al. 2019, the "Unlikelihood" baseline of Rafailov et
    al. 2023, Sec. 6), alpha = hparams["alpha"]. With alpha = 0 it is "Preferred-FT": supervised
    fine-tuning on the chosen completions (per-example mean NLL). Metrics: loss, logps/chosen,
    logps/rejected.
    """

    def loss_fn(params: Any, batch: Batch, *, frozen: Any = None, hparams: Any) -> tuple:
        b = batch["chosen_tokens"].shape[0]
        pc, pr, tlp = pair_logps(model, params, batch)  # [B], [B], [2B, T-1]
        mask = concat_pairs(batch, "loss_mask")[:, 1:]  # [2B, T-1]
        per_ex = losses.unlikelihood_loss(
            tlp[:b], mask[:b], tlp[b:], mask[b:], alpha=hparams["alpha"]
        )  # [B]
        loss = jnp.mean(per_ex)
        return loss, {"loss": loss, "logps/chosen": jnp.mean(pc), "logps/rejected": jnp.mean(pr)}

    return loss_fn


def make_unlikelihood_step(
    model: nn.Module, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure Unlikelihood / Preferred-FT step `step(state, batch) -> (state, metrics)`
    (`train.make_step` of `make_unlikelihood_loss`; un-jitted); alpha is
    `state.hparams["alpha"]`. Metrics: loss, grad_norm, update_norm, logps/chosen, logps/rejected.
    """
    return make_step(make_unlikelihood_loss(model), optimizer)
