"""Direct Preference Optimization step and its family (IPO, hinge, robust DPO, SimPO, ORPO).

Batch (contract "Preference batch", right-padded, int32 [B, T], same T for both sides):
  chosen_tokens, chosen_attention_mask, chosen_loss_mask,
  rejected_tokens, rejected_attention_mask, rejected_loss_mask
  optional reference_chosen_logps, reference_rejected_logps [B] float32 (precomputed by
  `rlhf_jax.train.reference.compute_reference_logps`; then the reference model is not run).

State: a `TrainState` whose `params` are the policy's, `frozen` the reference params (only needed
when the batch carries no reference log-probs, and never for SimPO/ORPO) and `hparams` holds
"beta" (and "gamma" for SimPO), float32 scalars, so that a beta sweep is `vmap` over states.

The loss is chosen by name or given as a function of the four sequence log-probs
(`losses.pairwise_loss`'s contract), e.g. DPO-Positive (Pal et al. 2024):

    def dpop(pc, pr, rc, rr, *, beta, lam=50.0):
        h = (pc - rc) - (pr - rr) - lam * jnp.maximum(0.0, rc - pc)
        return -jax.nn.log_sigmoid(beta * h)

    step = train.make_dpo_step(model, optimizer, loss_type=dpop)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from rlhf_jax import losses
from rlhf_jax.train.logps import target_logps
from rlhf_jax.train.reward import concat_pairs
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import LossFn, make_eval, make_step

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo", "cpo")
REFERENCE_FREE = ("simpo", "orpo", "cpo")  # no reference model, no reference log-probs
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def pair_logps(
    model: nn.Module, params: Any, batch: Batch, *, average: bool = False
) -> tuple[Float[Array, " B"], Float[Array, " B"], Float[Array, "_ _"]]:
    """Sequence log-probs of chosen and rejected under `params`, one forward on [2B, T].

    `log pi(y|x) = sum_t m[b, t+1] log softmax(logits[b, t])[x[b, t+1]]` with m the loss mask
    (mean over masked tokens when `average`).

    Returns:
      (chosen_logps [B], rejected_logps [B], token_logps [2B, T-1]).
    """
    b = batch["chosen_tokens"].shape[0]
    tokens = concat_pairs(batch, "tokens")  # [2B, T]
    attn = concat_pairs(batch, "attention_mask")
    tlp, _, _ = target_logps(model, params, tokens, attn)  # [2B, T-1]
    mask = concat_pairs(batch, "loss_mask")[:, 1:]  # [2B, T-1]
    seq = losses.sequence_logps(tlp, mask, average=average)  # [2B]
    return seq[:b], seq[b:], tlp


def make_dpo_loss(
    model: nn.Module,
    *,
    loss_type: str | losses.PairwiseLoss = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    gamma: float = 0.5,
    cpo_alpha: float = 1.0,
) -> LossFn:
    """Builds `loss_fn(params, batch, *, frozen, hparams) -> (loss, metrics)` (train.make_step's
    contract) for the DPO family.

    sigmoid/ipo/hinge/robust, or a user's pairwise loss `fn(pc, pr, rc, rr, *, beta) -> losses
      [B]` (or `(losses, metrics)`; `losses.pairwise_loss`): the mean of the pairwise loss on
      policy and reference sequence log-probs (Rafailov et al. 2023 eq. 7; Azar et al. 2023; Zhao
      et al. 2023; Chowdhury et al. 2024), beta = hparams["beta"]. Reference log-probs come from
      the batch when it has `reference_chosen_logps` (a trace-time decision on the batch keys),
      otherwise from a forward of `frozen` (the reference params) under stop_gradient.
    simpo: `losses.simpo_loss` on length-averaged log-probs (Meng et al. 2024, eq. 6), beta =
      hparams["beta"], gamma = hparams["gamma"] if present else the builder's `gamma`.
    orpo: `L = NLL(chosen) + lambda * losses.orpo_odds_ratio_loss` on length-averaged log-probs
      (Hong et al. 2024, eq. 6), lambda = hparams["beta"] (TRL's name); the NLL is the
      token-weighted mean over chosen response tokens.
    cpo: `L = mean(losses.cpo_loss) + cpo_alpha * NLL(chosen)` (Xu et al. 2024, eq. 3 and 4):
      DPO's sigmoid loss (with `label_smoothing`) on the policy's sequence log-probs (summed,
      or averaged with `average_log_prob`), beta = hparams["beta"]; the NLL as ORPO's.
    SimPO, ORPO and CPO need no reference.

    Metrics: loss, rewards/chosen, rewards/rejected (means of beta * implicit rewards),
    rewards/accuracy (fraction with chosen reward > rejected), rewards/margin, logps/chosen,
    logps/rejected (policy sequence log-probs as used by the loss); ORPO adds nll and
    odds_ratio_loss, CPO nll and preference_loss; a user's loss adds the means of the metrics it
    returns.

    Raises:
      ValueError: an unknown loss_type name (naming the accepted ones).
    """
    if not callable(loss_type) and loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; accepted values: {LOSS_TYPES}")
    reference_free = loss_type in REFERENCE_FREE
    average = average_log_prob or loss_type in ("simpo", "orpo")
    pairwise = (
        None if reference_free else losses.pairwise_loss(loss_type, label_smoothing=label_smoothing)
    )

    def loss_fn(
        params: Any, batch: Batch, *, frozen: Any = None, hparams: Mapping[str, jax.Array]
    ) -> tuple[jax.Array, Metrics]:
        beta = hparams["beta"]
        pc, pr, tlp = pair_logps(model, params, batch, average=average)  # [B], [B]
        extra = {}
        if pairwise is not None:
            if REFERENCE_KEYS[0] in batch:
                rc = jnp.asarray(batch[REFERENCE_KEYS[0]], jnp.float32)
                rr = jnp.asarray(batch[REFERENCE_KEYS[1]], jnp.float32)
            else:
                if frozen is None:
                    raise ValueError(
                        "DPO needs reference log-probs: put reference_chosen_logps/"
                        "reference_rejected_logps in the batch or reference params in "
                        "state.frozen"
                    )
                rc, rr, _ = pair_logps(model, jax.lax.stop_gradient(frozen), batch, average=average)
                rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
            per_ex, m = pairwise(pc, pr, rc, rr, beta=beta)
            r_c, r_r = beta * (pc - rc), beta * (pr - rr)  # [B] implicit rewards
            loss = jnp.mean(per_ex)
            known = ("chosen_rewards", "rejected_rewards", "margins", "accuracies")
            extra = {k: jnp.mean(v) for k, v in m.items() if k not in known}
        elif loss_type == "simpo":
            g = hparams["gamma"] if "gamma" in hparams else gamma
            loss = jnp.mean(losses.simpo_loss(pc, pr, beta=beta, gamma=g))
            r_c, r_r = beta * pc, beta * pr
        else:  # orpo, cpo: a preference term plus the NLL of the chosen completions
            b = pc.shape[0]
            mask = batch["chosen_loss_mask"][:, 1:].astype(jnp.float32)  # [B, T-1]
            nll = -jnp.sum(jnp.where(mask > 0, tlp[:b], 0.0)) / jnp.maximum(mask.sum(), 1.0)
            r_c, r_r = beta * pc, beta * pr
            if loss_type == "orpo":
                odds = jnp.mean(losses.orpo_odds_ratio_loss(pc, pr))
                loss = nll + beta * odds
                extra = {"nll": nll, "odds_ratio_loss": odds}
            else:
                pref = jnp.mean(losses.cpo_loss(pc, pr, beta=beta, label_smoothing=label_smoothing))
                loss = pref + cpo_alpha * nll
                extra = {"nll": nll, "preference_loss": pref}
        metrics = {
            "loss": loss,
            "rewards/chosen": jnp.mean(r_c),
            "rewards/rejected": jnp.mean(r_r),
            "rewards/accuracy": jnp.mean((r_c > r_r).astype(jnp.float32)),
            "rewards/margin": jnp.mean(r_c - r_r),
            "logps/chosen": jnp.mean(pc),
            "logps/rejected": jnp.mean(pr),
            **extra,
        }
        return loss, metrics

    return loss_fn


def make_dpo_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    loss_type: str | losses.PairwiseLoss = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    microbatches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure DPO-family step `step(state, batch) -> (state, metrics)` (un-jitted):
    `train.make_step(make_dpo_loss(...), optimizer)`.

    Args:
      model: the policy `Transformer` (the reference, if run, is the same module).
      optimizer: the optax transformation `state.opt_state` belongs to.
      loss_type: "sigmoid" (DPO), "ipo", "hinge", "robust" (all `losses.dpo_loss`), "simpo",
        "orpo", "cpo", or a pairwise loss function `fn(pc, pr, rc, rr, *, beta) -> losses [B]`.
        IPO is defined on length-averaged log-probs in TRL: pass average_log_prob=True.
      label_smoothing: conservative-DPO / robust-DPO label noise epsilon.
      average_log_prob: use mean instead of sum of token log-probs (forced for simpo/orpo).
        Precomputed reference log-probs must have been computed with the same setting.
      gamma: SimPO's target margin when `state.hparams` has no "gamma".
      cpo_alpha: the weight of CPO's NLL term.
      microbatches: gradient accumulation over that many microbatches (`train.make_step`).
    Returns:
      The step; beta is `state.hparams["beta"]`. Metrics: loss, grad_norm, update_norm,
      rewards/{chosen,rejected,accuracy,margin}, logps/{chosen,rejected}.
    """
    loss_fn = make_dpo_loss(
        model,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        average_log_prob=average_log_prob,
        gamma=gamma,
        cpo_alpha=cpo_alpha,
    )
    return make_step(loss_fn, optimizer, microbatches=microbatches)


def make_dpo_eval(model: nn.Module, **kwargs) -> Callable[[TrainState, Batch], Metrics]:
    """`eval_fn(state, batch) -> metrics`: the DPO metrics without an update (same kwargs as
    `make_dpo_step` minus the optimizer)."""
    return make_eval(make_dpo_loss(model, **kwargs))
