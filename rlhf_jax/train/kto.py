"""KTO (Ethayarajh et al. 2024) as a step of the one contract: `make_step(make_kto_loss(...))`.

A batch of unpaired rows (prompt + completion, each labelled desirable or not):
  "tokens", "attention_mask", "loss_mask"  [B, T]  the rows (loss mask on completion tokens);
  "desirable"                              [B]     1 / 0 (TRL's `label`);
  "kl_tokens", "kl_attention_mask", "kl_loss_mask"  [B, T]  the MISMATCHED pairs: row i's
      completion after another row's prompt (`data` builds them from row i + 1's prompt, as TRL
      does), from which the reference point z0 is estimated;
and optionally "reference_logps", "reference_kl_logps" [B] (precomputed; otherwise the frozen
reference params are run). The policy's log-probs of the mismatched pairs take no gradient: z0 is
a constant of the step (`losses.kto_reference_point`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.train.logps import target_logps
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import make_step

Batch = Mapping[str, jax.Array]
KTO_REFERENCE_KEYS = ("reference_logps", "reference_kl_logps")


def _seq_logps(model: nn.Module, params: Any, batch: Batch, prefix: str) -> jax.Array:
    """[B] summed completion log-probs of the rows under `prefix` ("" or "kl_")."""
    tlp, _, _ = target_logps(
        model, params, batch[f"{prefix}tokens"], batch[f"{prefix}attention_mask"]
    )
    return losses.sequence_logps(tlp, batch[f"{prefix}loss_mask"][:, 1:])


def make_kto_loss(
    model: nn.Module, *, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """`loss_fn(params, batch, *, frozen, hparams)`: the mean of `losses.kto_loss` over the batch,
    beta = hparams["beta"], with z0 from the batch's mismatched pairs.

    Metrics: loss, kl (z0), rewards/desirable and rewards/undesirable (mean beta r of each class;
    0 when the batch has none), logps/policy (mean sequence log-prob), desirable_fraction.
    """

    def loss_fn(params: Any, batch: Batch, *, frozen: Any = None, hparams: Mapping[str, Any]):
        beta = hparams["beta"]
        pol = _seq_logps(model, params, batch, "")
        pol_kl = jax.lax.stop_gradient(_seq_logps(model, params, batch, "kl_"))
        if KTO_REFERENCE_KEYS[0] in batch:
            ref = jnp.asarray(batch[KTO_REFERENCE_KEYS[0]], jnp.float32)
            ref_kl = jnp.asarray(batch[KTO_REFERENCE_KEYS[1]], jnp.float32)
        else:
            if frozen is None:
                raise ValueError(
                    "KTO needs reference log-probs: put reference_logps/reference_kl_logps in the "
                    "batch or reference params in state.frozen"
                )
            ref_params = jax.lax.stop_gradient(frozen)
            ref = jax.lax.stop_gradient(_seq_logps(model, ref_params, batch, ""))
            ref_kl = jax.lax.stop_gradient(_seq_logps(model, ref_params, batch, "kl_"))
        z0 = losses.kto_reference_point(pol_kl, ref_kl)
        per_row, m = losses.kto_loss(
            pol, ref, batch["desirable"], z0, beta=beta,
            desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        )  # fmt: skip
        good = jnp.asarray(batch["desirable"]) > 0

        def class_mean(x, which):
            return jnp.sum(jnp.where(which, x, 0.0)) / jnp.maximum(jnp.sum(which), 1)

        loss = jnp.mean(per_row)
        return loss, {
            "loss": loss,
            "kl": z0,
            "rewards/desirable": class_mean(m["rewards"], good),
            "rewards/undesirable": class_mean(m["rewards"], ~good),
            "logps/policy": jnp.mean(pol),
            "desirable_fraction": jnp.mean(good.astype(jnp.float32)),
        }

    return loss_fn


def make_kto_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    microbatches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure KTO step `step(state, batch) -> (state, metrics)`: `make_step(make_kto_loss)`;
    beta is `state.hparams["beta"]`, the reference `state.frozen` (or the batch's precomputed
    log-probs). With `microbatches`, z0 is estimated per microbatch."""
    loss_fn = make_kto_loss(
        model, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight
    )
    return make_step(loss_fn, optimizer, microbatches=microbatches)
