"""The PPO update (clipped policy and value losses over minibatch epochs) and `make_ppo`, which
binds rollout, score and update of one configuration (see `rlhf_jax.train.ppo` for the data flow).

The minibatch update is `train.make_step` of `make_ppo_loss` over the joint params
`(policy_params, value_params)`, with `paired_optimizer(policy_optimizer, value_optimizer)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import lora as lora_lib
from rlhf_jax import losses
from rlhf_jax.train.logps import masked_seq_sum, response_logps_entropy, response_slice, sequence
from rlhf_jax.train.ppo import (
    RNG_MINIBATCH,
    PPOConfig,
    PPOState,
    Rollout,
    make_ppo_rollout,
    make_ppo_score,
    policy_view,
    rollout_metrics,
    value_view,
)
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import LossFn, make_step, paired_optimizer

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def make_ppo_loss(policy_model: nn.Module, value_model: nn.Module, cfg: PPOConfig) -> LossFn:
    """`loss_fn((policy_params, value_params), minibatch, *, frozen, hparams) -> (loss, metrics)`
    (train.make_step's contract).

    `loss = ppo_policy_loss(logps, old_logps, A) + vf_coef * ppo_value_loss(V, old_V, returns)`
    (Schulman et al. 2017, eq. 7 and 9), logps recomputed under softmax(logits / temperature) as
    in the rollout. The minibatch is a dict of Rollout fields. Under LoRA (`_adapted`) frozen
    is `{"ref": state.ref_params, "reward": state.reward_params}`, the bases of the adapters.
    """

    def loss_fn(params, mb, *, frozen=None, hparams=None):
        policy_params, value_params = params
        if _adapted(policy_model, value_model):  # LoRA: the bases are frozen["ref"/"reward"]
            ref, reward = frozen["ref"], frozen["reward"]
            policy_params = policy_view(policy_model, policy_params, ref)
            value_params = value_view(value_model, value_params, ref, reward)
        r_tok, r_mask = mb["response_tokens"], mb["response_mask"]
        p, n = mb["query_tokens"].shape[1], r_tok.shape[1]
        tokens, mask = sequence(mb["query_tokens"], mb["query_mask"], r_tok, r_mask)
        logps, entropy = response_logps_entropy(
            policy_model, policy_params, tokens, mask, r_tok, p, cfg.temperature
        )
        pg_loss, pg_m = losses.ppo_policy_loss(
            logps, mb["logps"], mb["advantages"], r_mask, clip_eps=cfg.clip_eps
        )
        values = response_slice(value_model.apply({"params": value_params}, tokens, mask), p, n)
        vf_loss, vf_m = losses.ppo_value_loss(
            values, mb["values"], mb["returns"], r_mask, clip_eps=cfg.value_clip_eps
        )
        live = r_mask > 0
        n_tok = jnp.maximum(jnp.sum(live), 1)
        metrics = {
            "policy_loss": pg_loss,
            "value_loss": vf_loss,
            "clipfrac": pg_m["clipfrac"],
            "approx_kl": pg_m["approx_kl"],
            "value_clipfrac": vf_m["clipfrac"],
            "entropy": jnp.sum(jnp.where(live, entropy, 0.0)) / n_tok,
            "value_error": jnp.sum(jnp.where(live, jnp.square(values - mb["returns"]), 0.0))
            / n_tok,
        }
        loss = pg_loss + cfg.vf_coef * vf_loss
        return loss, {"loss": loss, **metrics}

    return loss_fn


def _adapted(policy_model: nn.Module, value_model: nn.Module) -> bool:
    return isinstance(policy_model, lora_lib.LoraTransformer) or isinstance(
        value_model, lora_lib.LoraValueModel
    )


_TRAIN_FIELDS = (
    "query_tokens",
    "query_mask",
    "response_tokens",
    "response_mask",
    "logps",
    "values",
    "advantages",
    "returns",
)


def make_ppo_update(
    policy_model: nn.Module,
    value_model: nn.Module,
    policy_optimizer: optax.GradientTransformation,
    value_optimizer: optax.GradientTransformation,
    cfg: PPOConfig,
) -> Callable[[PPOState, Rollout], tuple[PPOState, Metrics]]:
    """Builds `update(state, rollout) -> (state, metrics)`: one compiled PPO update.

    `lax.scan` over cfg.ppo_epochs epochs, each a `lax.scan` over cfg.num_minibatches minibatches
    of a permutation drawn from fold_in(fold_in(rng, step), 1); every minibatch takes one step of
    each optimizer on the gradient of `loss = policy_loss + vf_coef * value_loss` w.r.t. both
    param trees. Then, with cfg.kl_target set, `kl_coef = adaptive_kl_coef(kl_coef, mean_b
    sum_t k(t), B, target, horizon)` (k = cfg.kl_estimator on the rollout). step += 1.

    Metrics (minibatch means, plus rollout statistics): loss, grad_norm / update_norm (joint over
    both trees), policy_grad_norm, value_grad_norm (and their update norms), policy_loss,
    value_loss, clipfrac, approx_kl, value_clipfrac, entropy, value_error, score,
    score_penalized, rlhf_reward, kl_k1, kl_k3, kl_exact, kl_coef (the one used for this
    rollout), kl_coef_next, response_length, eos_rate, advantage_mean, return_mean.
    """
    for model in (policy_model, value_model):
        lora_lib.check_no_dropout(model, "PPO")
    adapted = _adapted(policy_model, value_model)
    minibatch_step = make_step(
        make_ppo_loss(policy_model, value_model, cfg),
        paired_optimizer(policy_optimizer, value_optimizer),
        norm_groups={"policy": lambda p: p[0], "value": lambda p: p[1]},
    )

    def update(state: PPOState, ro: Rollout) -> tuple[PPOState, Metrics]:
        b = ro.response_tokens.shape[0]
        nmb = cfg.num_minibatches
        if b % nmb:
            raise ValueError(f"rollout batch {b} is not divisible by num_minibatches={nmb}")
        data = {k: getattr(ro, k) for k in _TRAIN_FIELDS}
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), RNG_MINIBATCH)

        def epoch(carry, rng_epoch):
            perm = jax.random.permutation(rng_epoch, b).reshape(nmb, b // nmb)  # [M, b/M]
            return jax.lax.scan(
                lambda c, idx: minibatch_step(c, jax.tree.map(lambda x: x[idx], data)), carry, perm
            )

        joint = TrainState(
            params=(state.policy_params, state.value_params),
            opt_state=(state.policy_opt_state, state.value_opt_state),
            step=state.step,
            rng=state.rng,
            frozen={"ref": state.ref_params, "reward": state.reward_params} if adapted else None,
        )
        joint, metrics = jax.lax.scan(epoch, joint, jax.random.split(rng, cfg.ppo_epochs))
        metrics = jax.tree.map(jnp.mean, metrics)  # over epochs x minibatches
        kl_coef = state.kl_coef
        if cfg.kl_target is not None:
            seq_kl = masked_seq_sum(
                losses.kl_estimate(ro.logps, ro.ref_logps, estimator=cfg.kl_estimator),
                ro.response_mask,
            )  # [B]
            kl_coef = losses.adaptive_kl_coef(
                kl_coef, jnp.mean(seq_kl), b, target=cfg.kl_target, horizon=cfg.kl_horizon
            )
        metrics = {
            **metrics,
            **rollout_metrics(ro, cfg, state.kl_coef),
            "kl_coef_next": jnp.asarray(kl_coef, jnp.float32),
        }
        state = state.replace(
            policy_params=joint.params[0],
            policy_opt_state=joint.opt_state[0],
            value_params=joint.params[1],
            value_opt_state=joint.opt_state[1],
            kl_coef=jnp.asarray(kl_coef, jnp.float32),
            step=state.step + 1,
        )
        return state, metrics

    return update


class PPOFunctions(NamedTuple):
    """The pure PPO functions of one configuration (see the module doc for the data flow)."""

    rollout: Callable[[PPOState, Batch], tuple[PPOState, Rollout]]
    score: Callable[[PPOState, Rollout], tuple[PPOState, Rollout]]
    update: Callable[[PPOState, Rollout], tuple[PPOState, Metrics]]
    rollout_and_score: Callable[[PPOState, Batch], tuple[PPOState, Rollout]] | None
    step: Callable[[PPOState, Batch], tuple[PPOState, Metrics]] | None


def make_ppo(
    policy_model: nn.Module,
    value_model: nn.Module,
    policy_optimizer: optax.GradientTransformation,
    value_optimizer: optax.GradientTransformation,
    cfg: PPOConfig,
    *,
    reward_fn: Callable[[Any, Rollout], jax.Array] | None = None,
) -> PPOFunctions:
    """All PPO functions for one configuration.

    Args:
      policy_model: the policy (and reference) `Transformer`; a `lora.LoraTransformer` trains
        adapters on the base `state.ref_params`, which is then also the reference.
      value_model: the critic `ValueModel`; a `lora.LoraValueModel` trains adapters and its
        head on the reward model's trunk (`state.reward_params`), or on `state.ref_params`.
      policy_optimizer, value_optimizer: optax transformations of the two param trees.
      cfg: PPOConfig.
      reward_fn: a JAX function `(state.reward_params, rollout) -> scores [B]` (e.g.
        `reward_model_fn(RewardModel(cfg))`); then `rollout_and_score` and the fused `step`
        exist. None for a host reward (Python on decoded texts): use rollout → host → score.
    Returns:
      PPOFunctions(rollout, score, update, rollout_and_score, step); un-jitted.
    """
    rollout = make_ppo_rollout(policy_model, value_model, cfg)
    score = make_ppo_score(cfg)
    update = make_ppo_update(policy_model, value_model, policy_optimizer, value_optimizer, cfg)
    if reward_fn is None:
        return PPOFunctions(rollout, score, update, None, None)

    def rollout_and_score(state: PPOState, batch: Batch) -> tuple[PPOState, Rollout]:
        state, ro = rollout(state, batch)
        scores = jax.lax.stop_gradient(reward_fn(state.reward_params, ro))  # [B]
        return score(state, ro.replace(scores=jnp.asarray(scores, jnp.float32)))

    def step(state: PPOState, batch: Batch) -> tuple[PPOState, Metrics]:
        state, ro = rollout_and_score(state, batch)
        return update(state, ro)

    return PPOFunctions(rollout, score, update, rollout_and_score, step)


def make_ppo_step(
    policy_model: nn.Module,
    value_model: nn.Module,
    policy_optimizer: optax.GradientTransformation,
    value_optimizer: optax.GradientTransformation,
    cfg: PPOConfig,
    reward_fn: Callable[[Any, Rollout], jax.Array],
) -> Callable[[PPOState, Batch], tuple[PPOState, Metrics]]:
    """The fused `step(state, prompt_batch) -> (state, metrics)`: rollout, JAX reward, score,
    update in one program (see `make_ppo`)."""
    fns = make_ppo(
        policy_model, value_model, policy_optimizer, value_optimizer, cfg, reward_fn=reward_fn
    )
    return fns.step
