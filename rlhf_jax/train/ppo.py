"""PPO on the KL-regularized objective (seed eq. 3; Ziegler et al. 2019, Stiennon et al. 2020).

One iteration (DESIGN.md, "the data flow of one PPO iteration") is three pure functions, each
`(state, x) -> (state, y)` so that drivers compile each with the one sharding helper:

  rollout(state, prompt_batch) -> (state, Rollout)   generate with the policy; teacher-forced
                                                     policy / reference / value forwards: old
                                                     log-probs, reference log-probs, values,
                                                     exact per-token KL. `scores` are zeros.
  [host: scores = reward(texts)]                     e.g. the VADER ground truth; then
                                                     rollout = rollout.replace(scores=scores)
  score(state, rollout) -> (state, Rollout)          missing-EOS penalty, kl_penalized_rewards,
                                                     (whitened rewards), gae, whitened advantages
  update(state, rollout) -> (state, metrics)         ppo_epochs x num_minibatches of clipped
                                                     policy + value updates in one program,
                                                     then the adaptive KL coefficient

When the reward is a JAX function (a reward model: `reward_model_fn(RewardModel(cfg))`),
`make_ppo_step` fuses all three into `step(state, prompt_batch) -> (state, metrics)`. The update
and `make_ppo` live in `rlhf_jax.train.ppo_update`.

Prompt batch: {"prompt_tokens": [B, P] int32 LEFT-padded, "prompt_mask": [B, P]}.
Sequence layout of every forward: `[prompt (left-padded, P)][response (N, pad after EOS)]`, mask
`[prompt_mask][response_mask]`; the logits/values that concern response token i sit at position
P - 1 + i (the state before emitting it).

Missing-EOS penalty (`missing_eos_penalty`, as TRL): a completion with no EOS within
`max_new_tokens` gets `score - missing_eos_penalty` (mode "subtract", TRL's) or
`score := missing_eos_penalty` (mode "replace", the older `non_eos_penalty` /
`penalty_reward_value` behaviour, pass a negative value). `Rollout.scores` keeps the raw scores;
the penalty shows only in `rewards` (and the `score_penalized` metric).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int

from rlhf_jax import lora as lora_lib
from rlhf_jax import losses
from rlhf_jax import sharding as sh
from rlhf_jax.sampling import SamplingConfig, generate
from rlhf_jax.train.logps import logps_and_exact_kl, masked_seq_sum, response_slice, sequence
from rlhf_jax.train.state import as_key, unalias

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

# fold_in purposes of the step key (deterministic and resumable).
RNG_SAMPLE, RNG_MINIBATCH = 0, 1


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (defaults: TRL's PPOTrainer where it has one).

    Attributes:
      kl_coef: initial KL coefficient beta of seed eq. 3 (per-token penalty weight).
      kl_target: target per-sequence KL of the adaptive controller (Ziegler et al. 2019, 2.2);
        None keeps kl_coef fixed.
      kl_horizon: controller horizon in episodes.
      kl_estimator: "k1", "k2" or "k3", or a function `(logps, ref_logps) -> [B, T]`: the
        per-token KL in the reward and in the controller.
      gamma, lam: GAE discount and lambda.
      clip_eps: policy ratio clip range; value_clip_eps: value clip range.
      vf_coef: value-loss weight in loss = policy_loss + vf_coef * value_loss.
      ppo_epochs: passes over the rollout per update; num_minibatches: minibatches per pass
        (must divide the rollout batch).
      whiten_advantages: whiten advantages over the batch (masked); whiten_rewards: rescale the
        per-token rewards (mean kept) before GAE.
      missing_eos_penalty: None, or the penalty for completions without EOS (see module doc);
        missing_eos_mode: "subtract" (TRL) or "replace".
      temperature, max_new_tokens, top_k, top_p, eos_id, pad_id: sampling (rlhf_jax.sampling;
        `cfg.sampling` is the `SamplingConfig` of the first four, shared with eval and pairs).
        The loss's log-probs are under softmax(logits / temperature) (untruncated).
    """

    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    kl_estimator: str | Callable[[Any, Any], Any] = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    num_minibatches: int = 1
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    missing_eos_mode: str = "subtract"
    temperature: float = 1.0
    max_new_tokens: int = 16
    eos_id: int | None = None
    pad_id: int = 0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        """Checks every field on the host (a traced coefficient could not be checked later);
        the message names the field and the accepted values."""
        if not (callable(self.kl_estimator) or self.kl_estimator in losses.KL_ESTIMATORS):
            raise ValueError(
                f"kl_estimator must be one of {losses.KL_ESTIMATORS} or a function, got "
                f"{self.kl_estimator!r}"
            )
        if self.missing_eos_mode not in ("subtract", "replace"):
            raise ValueError("missing_eos_mode must be 'subtract' or 'replace'")
        checks = [
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("kl_target", self.kl_target is None or self.kl_target > 0, "> 0 (or None)"),
            ("kl_horizon", self.kl_horizon > 0, "> 0"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
            ("clip_eps", self.clip_eps > 0, "> 0"),
            ("value_clip_eps", self.value_clip_eps > 0, "> 0"),
            ("vf_coef", self.vf_coef >= 0, ">= 0"),
            ("ppo_epochs", self.ppo_epochs >= 1, ">= 1"),
            ("num_minibatches", self.num_minibatches >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0 (sampling, and logits / temperature)"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("top_k", self.top_k is None or self.top_k >= 1, ">= 1 (or None)"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "in (0, 1] (or None)"),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"PPO {name} must be {accepted}, got {getattr(self, name)!r}")

    @property
    def sampling(self) -> SamplingConfig:
        """The rollout's `SamplingConfig` (max_new_tokens, temperature, top_k, top_p)."""
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


@flax.struct.dataclass
class PPOState:
    """Everything one PPO iteration reads or writes (a pytree; donate it).

    Attributes:
      policy_params, policy_opt_state: the trained policy (a `Transformer`) and its optax state;
        under LoRA (a `lora.LoraTransformer`) its adapters, on the base `ref_params`.
      value_params, value_opt_state: the critic (a `ValueModel`) and its optax state; under
        LoRA (a `lora.LoraValueModel`) its adapters and head (`lora.trained`) on the reward
        model's trunk (or, with a host reward, on `ref_params`).
      ref_params: frozen reference policy (pi_ref, the SFT model); under LoRA the base the
        adapters sit on, which is also the reference (adapters off): one copy.
      reward_params: frozen reward-model params, or None when the reward is a host function.
      kl_coef: float32 scalar, current KL coefficient.
      step: int32 scalar, number of updates so far.
      rng: the run's base key; iteration keys are fold_in(rng, step).
    """

    policy_params: Any
    policy_opt_state: Any
    value_params: Any
    value_opt_state: Any
    ref_params: Any
    reward_params: Any
    kl_coef: Any
    step: Any
    rng: Any


@flax.struct.dataclass
class Rollout:
    """One batch of episodes (all float32 unless noted; B batch, P prompt, N new tokens).

    query_tokens [B, P] int32, query_mask [B, P] int32: the left-padded prompts.
    response_tokens [B, N] int32, response_mask [B, N] int32 (1 up to and including EOS).
    sample_logps [B, N]: log-probs reported by the sampler.
    logps [B, N]: teacher-forced policy log-probs at rollout time (PPO's old log-probs).
    ref_logps [B, N]: reference log-probs of the same tokens.
    values [B, N]: critic values V(s_t) at rollout time.
    kl_exact [B, N]: full-vocabulary KL(pi(.|s_t) || pi_ref(.|s_t)) (losses.exact_kl).
    has_eos [B] int32: 1 where the completion contains eos_id.
    scores [B]: raw sequence scores (zeros until scored).
    rewards, advantages, returns [B, N]: filled by `score` (zeros before).
    """

    query_tokens: Any
    query_mask: Any
    response_tokens: Any
    response_mask: Any
    sample_logps: Any
    logps: Any
    ref_logps: Any
    values: Any
    kl_exact: Any
    has_eos: Any
    scores: Any
    rewards: Any
    advantages: Any
    returns: Any


def create_ppo_state(
    cfg: PPOConfig,
    *,
    policy_params: Any,
    value_params: Any,
    ref_params: Any,
    policy_optimizer: optax.GradientTransformation,
    value_optimizer: optax.GradientTransformation,
    rng: Any,
    reward_params: Any = None,
) -> PPOState:
    """A `PPOState` at step 0 with `kl_coef = cfg.kl_coef`.

    Leaves shared between the param trees (a reference or value trunk initialised from the very
    same arrays as the policy) are copied so the state can be donated.
    """
    ref_params = unalias(ref_params, policy_params)
    value_params = unalias(value_params, (policy_params, ref_params))
    if reward_params is not None:
        reward_params = unalias(reward_params, (policy_params, ref_params, value_params))
    return PPOState(
        policy_params=policy_params,
        policy_opt_state=policy_optimizer.init(policy_params),
        value_params=value_params,
        value_opt_state=value_optimizer.init(value_params),
        ref_params=ref_params,
        reward_params=reward_params,
        kl_coef=jnp.asarray(cfg.kl_coef, jnp.float32),
        step=jnp.zeros((), jnp.int32),
        rng=as_key(rng),
    )


def policy_view(policy_model: nn.Module, policy_params: Any, ref_params: Any) -> Any:
    """The policy's params as its model reads them: under LoRA (a `lora.LoraTransformer`)
    `policy_params` are the adapters and `ref_params` their frozen base, the reference."""
    if isinstance(policy_model, lora_lib.LoraTransformer):
        return lora_lib.view(policy_params, ref_params)
    return policy_params


def reference_view(policy_model: nn.Module, ref_params: Any) -> Any:
    """The reference's params: `ref_params`, or under LoRA the base with its adapters off."""
    if isinstance(policy_model, lora_lib.LoraTransformer):
        return {"base": ref_params}
    return ref_params


def value_view(value_model: nn.Module, value_params: Any, ref_params: Any, reward_params: Any):
    """The critic's params as its model reads them. A `lora.LoraValueModel` trains adapters and
    its head (`lora.trained`) on a frozen trunk held nowhere else: the reward model's trunk, or
    with a host reward the policy's reference."""
    if isinstance(value_model, lora_lib.LoraValueModel):
        trunk = ref_params if reward_params is None else reward_params["transformer"]
        return lora_lib.view(value_params, {"transformer": trunk})
    return value_params


def make_ppo_rollout(
    policy_model: nn.Module, value_model: nn.Module, cfg: PPOConfig
) -> Callable[[PPOState, Batch], tuple[PPOState, Rollout]]:
    """Builds `rollout(state, prompt_batch) -> (state, Rollout)` (state unchanged; scores 0).
    With a `lora.LoraTransformer` policy (and/or a `lora.LoraValueModel` critic) the state's
    trained params are adapters, read through `policy_view` / `value_view`.

    Samples N = cfg.max_new_tokens tokens with key fold_in(fold_in(rng, step), 0), then one
    teacher-forced forward each of the policy, the reference and the critic on the full sequence
    (with the model's `logits_chunk`, the log-probs and the exact KL in chunks of positions).
    """

    def rollout(state: PPOState, batch: Batch) -> tuple[PPOState, Rollout]:
        q_tok = jnp.asarray(batch["prompt_tokens"], jnp.int32)  # [B, P]
        q_mask = jnp.asarray(batch["prompt_mask"]).astype(jnp.int32)  # [B, P]
        b, p = q_tok.shape
        rng_sample = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), RNG_SAMPLE)
        policy = policy_view(policy_model, state.policy_params, state.ref_params)
        gen = generate(
            policy_model,
            policy,
            q_tok,
            q_mask,
            rng_sample,
            **cfg.sampling.generate_kwargs(),
            eos_id=cfg.eos_id,
            pad_id=cfg.pad_id,
        )
        r_tok, r_mask = sh.constrain_rows((gen.tokens, gen.mask.astype(jnp.int32)))  # [B, N]
        tokens, mask = sequence(q_tok, q_mask, r_tok, r_mask)  # [B, P+N]
        ref = reference_view(policy_model, state.ref_params)
        logps, ref_logps, kl_exact = logps_and_exact_kl(  # chunked: no [B, N, V] logits held
            policy_model, policy, ref, tokens, mask, p - 1, r_tok.shape[1],
            temperature=cfg.temperature,
        )  # fmt: skip
        value = value_view(value_model, state.value_params, state.ref_params, state.reward_params)
        values = value_model.apply({"params": value}, tokens, mask)  # [B, P+N]
        values = response_slice(values, p, cfg.max_new_tokens)  # [B, N]
        live = r_mask > 0
        if cfg.eos_id is None:
            has_eos = jnp.zeros((b,), jnp.int32)
        else:
            has_eos = jnp.any(live & (r_tok == cfg.eos_id), axis=1).astype(jnp.int32)  # [B]
        zeros = jnp.zeros_like(logps)
        ro = Rollout(
            query_tokens=q_tok,
            query_mask=q_mask,
            response_tokens=r_tok,
            response_mask=r_mask,
            sample_logps=gen.logps,
            logps=jnp.where(live, logps, 0.0),
            ref_logps=jnp.where(live, ref_logps, 0.0),
            values=jnp.where(live, values, 0.0),
            kl_exact=jnp.where(live, kl_exact, 0.0),
            has_eos=has_eos,
            scores=jnp.zeros((b,), jnp.float32),
            rewards=zeros,
            advantages=zeros,
            returns=zeros,
        )
        return state, jax.lax.stop_gradient(ro)

    return rollout


def penalize_missing_eos(
    scores: Float[ArrayLike, " B"], has_eos: Int[ArrayLike, " B"], cfg: PPOConfig
) -> Float[Array, " B"]:
    """Scores after the missing-EOS penalty (module doc); unchanged when the penalty is None."""
    scores = jnp.asarray(scores, jnp.float32)
    if cfg.missing_eos_penalty is None or cfg.eos_id is None:
        return scores
    missing = has_eos == 0  # [B]
    if cfg.missing_eos_mode == "subtract":
        return jnp.where(missing, scores - cfg.missing_eos_penalty, scores)
    return jnp.where(missing, jnp.float32(cfg.missing_eos_penalty), scores)


def make_ppo_score(cfg: PPOConfig) -> Callable[[PPOState, Rollout], tuple[PPOState, Rollout]]:
    """Builds `score(state, rollout) -> (state, rollout)` from `rollout.scores` [B].

    `R = kl_penalized_rewards(penalized scores, logps, ref_logps, mask, kl_coef=state.kl_coef)`
    (seed eq. 3 per token), optionally `whiten(R, shift_mean=False)`, then
    `A, returns = gae(R, values, mask)` and optionally `A = whiten(A)`.
    """

    def score(state: PPOState, ro: Rollout) -> tuple[PPOState, Rollout]:
        mask = ro.response_mask
        scores = penalize_missing_eos(ro.scores, ro.has_eos, cfg)  # [B]
        rewards = losses.kl_penalized_rewards(
            scores, ro.logps, ro.ref_logps, mask, kl_coef=state.kl_coef, estimator=cfg.kl_estimator
        )  # [B, N]
        if cfg.whiten_rewards:
            rewards = losses.whiten(rewards, mask, shift_mean=False)
        adv, ret = losses.gae(rewards, ro.values, mask, gamma=cfg.gamma, lam=cfg.lam)  # [B, N]
        if cfg.whiten_advantages:
            adv = losses.whiten(adv, mask)
        ro = ro.replace(
            scores=jnp.asarray(ro.scores, jnp.float32), rewards=rewards, advantages=adv, returns=ret
        )
        return state, jax.lax.stop_gradient(ro)

    return score


def rollout_metrics(ro: Rollout, cfg: PPOConfig, kl_coef: jax.Array) -> Metrics:
    """Scalar statistics of a scored rollout, each a mean over the B sequences unless noted.

    score: the raw reward; score_penalized: after the missing-EOS penalty; rlhf_reward: the
    sum of the per-token rewards (penalised score - kl_coef * sum_t k_t); kl_k1 / kl_k3 /
    kl_exact: per-sequence sums over the response of log(pi / pi_ref), r - 1 - log r with
    r = pi_ref / pi, and the full-vocabulary KL; kl_coef: the coefficient passed (the one that
    shaped the rewards); response_length, eos_rate; advantage_mean / return_mean: means over the
    response tokens.
    """
    mask = ro.response_mask
    k1 = masked_seq_sum(losses.kl_estimate(ro.logps, ro.ref_logps, estimator="k1"), mask)
    k3 = masked_seq_sum(losses.kl_estimate(ro.logps, ro.ref_logps, estimator="k3"), mask)
    scores = penalize_missing_eos(ro.scores, ro.has_eos, cfg)
    return {
        "score": jnp.mean(ro.scores),
        "score_penalized": jnp.mean(scores),
        "rlhf_reward": jnp.mean(jnp.sum(ro.rewards, axis=-1)),
        "kl_k1": jnp.mean(k1),
        "kl_k3": jnp.mean(k3),
        "kl_exact": jnp.mean(masked_seq_sum(ro.kl_exact, mask)),
        "kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "response_length": jnp.mean(jnp.sum(mask, axis=-1).astype(jnp.float32)),
        "eos_rate": jnp.mean(ro.has_eos.astype(jnp.float32)),
        "advantage_mean": jnp.sum(ro.advantages * mask) / jnp.maximum(jnp.sum(mask), 1),
        "return_mean": jnp.sum(ro.returns * mask) / jnp.maximum(jnp.sum(mask), 1),
    }


def reward_model_fn(reward_model: nn.Module) -> Callable[[Any, Rollout], jax.Array]:
    """`reward_fn(reward_params, rollout) -> scores [B]`: a `RewardModel` on prompt + response
    (its head reads the last real token: EOS, or the last sampled token when truncated)."""

    def reward_fn(params: Any, ro: Rollout) -> jax.Array:
        tokens, mask = sequence(
            ro.query_tokens, ro.query_mask, ro.response_tokens, ro.response_mask
        )
        return reward_model.apply({"params": params}, tokens, mask)

    return reward_fn


def response_token_lists(
    ro: Any, *, include_query: bool = False, drop_id: int | None = None
) -> list[list[int]]:
    """Host helper for text rewards: each row of a `Rollout` or `CriticFreeRollout`: its real
    tokens (response only, or prompt +
    response) as Python lists, ready for `tokenizer.decode_batch`; `drop_id` (e.g. the EOS id)
    is removed from responses. Synchronises with the device."""
    r_tok, r_mask = np.asarray(ro.response_tokens), np.asarray(ro.response_mask)
    keep = (r_mask > 0) & (r_tok != drop_id) if drop_id is not None else r_mask > 0
    rows = [t[k].tolist() for t, k in zip(r_tok, keep)]
    if include_query:
        q_tok, q_mask = np.asarray(ro.query_tokens), np.asarray(ro.query_mask)
        rows = [q[m > 0].tolist() + r for q, m, r in zip(q_tok, q_mask, rows)]
    return rows
