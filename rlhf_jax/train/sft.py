"""Supervised fine-tuning step: masked next-token negative log-likelihood on demonstrations.

Batch (contract "Demonstration batch", right-padded, all int32 [B, T]):
  tokens          `[prompt][response][EOS][pad...]`
  attention_mask  1 on real tokens
  loss_mask       1 on response tokens and the EOS after them (not shifted)
The step predicts `tokens[:, 1:]` from `logits[:, :-1]` and weights them by `loss_mask[:, 1:]`.
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
from rlhf_jax.train.step import LossFn, make_step

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

_REDUCTIONS = ("token", "example")


def make_sft_loss(model: nn.Module, *, reduction: str = "token") -> LossFn:
    """Builds `loss_fn(params, batch, *, frozen, hparams) -> (loss, metrics)` (train.make_step's
    contract) for SFT (seed, "Supervised Fine-Tuning").

    reduction="token": `L = -sum_{b,t} m[b,t] log pi(x[b,t+1] | x[b,:t+1]) / max(sum m, 1)`, every
    response token weighs the same (long demonstrations count more; the usual SFT choice).
    reduction="example": `L = mean_b losses.sft_loss(...)[b]`, the per-example mean NLL averaged
    over examples (every demonstration weighs the same).

    Metrics: loss, nll_token (token-weighted NLL, whatever the reduction), accuracy (argmax ==
    target over masked tokens), num_tokens. Under `make_step(microbatches=k)` each is the mean
    over the k microbatches: num_tokens is then the tokens of one microbatch (on average), and
    nll_token / accuracy the mean of the microbatches' token means.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; accepted values: {_REDUCTIONS}")

    def loss_fn(
        params: Any, batch: Batch, *, frozen=None, hparams=None
    ) -> tuple[jax.Array, Metrics]:
        tokens, attn = batch["tokens"], batch["attention_mask"]
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)  # [B, T-1]
        tlp, hit, _ = target_logps(model, params, tokens, attn)  # [B, T-1] each
        n_tok = jnp.maximum(mask.sum(), 1.0)
        nll_token = -jnp.sum(jnp.where(mask > 0, tlp, 0.0)) / n_tok
        if reduction == "token":
            loss = nll_token
        else:  # losses.sft_loss: the mean over rows of each row's mean NLL
            loss = -jnp.mean(losses.sequence_logps(tlp, mask, average=True))
        hit = hit.astype(jnp.float32)  # [B, T-1]
        metrics = {
            "loss": loss,
            "nll_token": nll_token,
            "accuracy": jnp.sum(hit * mask) / n_tok,
            "num_tokens": mask.sum(),
        }
        return loss, metrics

    return loss_fn


def make_sft_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    reduction: str = "token",
    microbatches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure SFT step `step(state, batch) -> (state, metrics)` (un-jitted).

    Args:
      model: the `Transformer` (LM) whose params are `state.params`.
      optimizer: the optax transformation `state.opt_state` belongs to.
      reduction: "token" (token-weighted mean NLL, default) or "example" (mean over examples of
        the per-example mean NLL, `losses.sft_loss`).
      microbatches: gradient accumulation over that many microbatches (`train.make_step`): the
        mean of the microbatches' losses, so with "token" each microbatch's tokens are weighted
        within it (equal to the whole batch's token mean when they hold as many tokens).
    Returns:
      The step (`train.make_step` of `make_sft_loss`); metrics: loss, grad_norm, update_norm,
      nll_token, accuracy, num_tokens.
    """
    return make_step(
        make_sft_loss(model, reduction=reduction), optimizer, microbatches=microbatches
    )


def make_sft_eval(model: nn.Module, *, reduction: str = "token") -> Callable[[Any, Batch], Metrics]:
    """`eval_fn(params, batch) -> metrics`: the SFT metrics without an update."""
    loss_fn = make_sft_loss(model, reduction=reduction)
    return lambda params, batch: loss_fn(params, batch)[1]
