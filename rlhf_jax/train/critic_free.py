"""Critic-free RL on a language model: GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE++ as one
compiled iteration.

    fns = make_critic_free(model, optimizer, cfg, reward_fn=...)
    fns.rollout(state, prompt_batch) -> (state, ro)   G completions per prompt
                                              (`generate(num_samples=G)`), teacher-forced policy
                                              (and reference) log-probs, the reward when it is a
                                              JAX function or a reward model (else zeros)
    [host: ro = ro.replace(scores=...)]       a reward on decoded texts (`stages`' host path)
    fns.score(state, ro) -> (state, ro)       DAPO's overlong penalty and dynamic sampling (the
                                              first `num_groups` informative groups), the method's
                                              advantages
    fns.update(state, ro) -> (state, metrics) `epochs` x `num_minibatches` steps of
                                              `make_step(loss, optimizer)` with the loss
                                              `losses.policy_gradient_loss`
    fns.step(state, prompt_batch)             all three, one program: no host round trip

The state is a `TrainState` (`create_critic_free_state`): `params` the policy, `frozen` a dict
`{"ref": reference params, "reward": reward-model params}` (either key optional: the reference
is read when `hparams["kl_coef"]` is set or by REINFORCE++, the reward model when the reward is
one), `hparams["kl_coef"]`, `rng`. The reward is a JAX function
`reward_fn(prompt_tokens [B, P], prompt_mask, response_tokens [B, N], response_mask) -> [B]`
(e.g. `data.arithmetic.exact_match_reward`), or a `models.RewardModel` scored on prompt +
response with `frozen["reward"]`, or None (the host fills `scores`). Rows of the rollout are
prompt-major: row p * G + g is completion g of prompt p.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax import sharding as sh
from rlhf_jax.lora import LoraTransformer, check_no_dropout, lora_loss
from rlhf_jax.sampling import generate
from rlhf_jax.train.critic_free_config import ALGORITHMS, CriticFreeConfig
from rlhf_jax.train.logps import response_logps_entropy, sequence
from rlhf_jax.train.state import TrainState, create_train_state
from rlhf_jax.train.step import make_step

Batch = Mapping[str, jax.Array]
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
Reward = RewardFn | nn.Module | None  # a JAX function, a RewardModel, or None (host reward)
FROZEN_KEYS = ("ref", "reward", "base")


def create_critic_free_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    rng: Any,
    *,
    ref_params: Any = None,
    reward_params: Any = None,
    base_params: Any = None,
    kl_coef: float | None = None,
) -> TrainState:
    """The `TrainState` of a critic-free run: `frozen = {"ref": ref_params, "reward":
    reward_params, "base": base_params}` (the keys given), `hparams = {"kl_coef": kl_coef}` when
    given (checked on the host; it needs a reference). With LoRA (a `lora.LoraTransformer`
    policy), `params` are the adapters and `base_params` their frozen base, which is also the
    reference (adapters off) unless `ref_params` names another."""
    if kl_coef is not None and ref_params is None and base_params is None:
        raise ValueError("kl_coef needs ref_params, the reference the KL is measured against")
    named = (("ref", ref_params), ("reward", reward_params), ("base", base_params))
    frozen = {k: v for k, v in named if v is not None}
    hparams = {"kl_coef": kl_coef} if kl_coef is not None else None
    return create_train_state(params, optimizer, rng, frozen=frozen or None, hparams=hparams)


def _frozen(state, key: str) -> Any:
    frozen = state.frozen
    if frozen is None:
        return None
    if not isinstance(frozen, Mapping) or not set(frozen) <= set(FROZEN_KEYS):
        raise ValueError(
            "a critic-free state's frozen must be {'ref': params, 'reward': params, 'base': "
            "params} (each key optional); build it with train.create_critic_free_state"
        )
    return frozen.get(key)


def _policy(state) -> Any:
    """The policy's params as the model reads them: the adapters on their base under LoRA."""
    base = _frozen(state, "base")
    return state.params if base is None else {"base": base, "lora": state.params}


def _reference(state) -> Any:
    """The reference's params: frozen["ref"], else (LoRA) the base with the adapters off."""
    ref = _frozen(state, "ref")
    base = _frozen(state, "base")
    return {"base": base} if ref is None and base is not None else ref


@flax.struct.dataclass
class CriticFreeRollout:
    """One batch of P * G completions (prompt-major rows), all [B, ...] with B = P * G (K * G
    after dynamic sampling keeps K groups)."""

    query_tokens: Any  # [B, P] left-padded
    query_mask: Any  # [B, P]
    response_tokens: Any  # [B, N]
    response_mask: Any  # [B, N] (0 on the rows of groups dynamic sampling drops)
    logps: Any  # [B, N] teacher-forced log pi_old (at the sampling temperature)
    ref_logps: Any  # [B, N] log pi_ref (zeros when unused)
    scores: Any  # [B] the task reward
    advantages: Any  # [B, N]
    stats: dict = flax.struct.field(default_factory=dict)  # scalar metrics of the sampled batch


class CriticFreeFunctions(NamedTuple):
    """The pure functions of one critic-free configuration (see the module doc)."""

    rollout: Callable[[Any, Batch], tuple[Any, CriticFreeRollout]]
    score: Callable[[Any, CriticFreeRollout], tuple[Any, CriticFreeRollout]]
    update: Callable[[Any, CriticFreeRollout], tuple[Any, dict]]
    step: Callable[[Any, Batch], tuple[Any, dict]] | None  # None for a host reward


def make_critic_free_loss(model: nn.Module, cfg: CriticFreeConfig):
    """`loss_fn(params, rollout_minibatch, *, frozen, hparams)` of the step contract."""
    kwargs = cfg.loss_kwargs()

    def loss_fn(params, ro: CriticFreeRollout, *, frozen, hparams):
        del frozen
        tokens, mask = sequence(
            ro.query_tokens, ro.query_mask, ro.response_tokens, ro.response_mask
        )
        p = ro.query_tokens.shape[1]
        logps, entropy = response_logps_entropy(
            model, params, tokens, mask, ro.response_tokens, p, cfg.temperature
        )
        kl = {}
        if cfg.kl_in == "loss" and "kl_coef" in (hparams or {}):  # a state with a reference
            kl = dict(
                ref_logps=ro.ref_logps,
                kl_coef=hparams.get("kl_coef", 0.0),
                kl_estimator=cfg.kl_estimator or "k3",
            )
        loss, metrics = losses.policy_gradient_loss(
            logps, ro.logps, ro.advantages, ro.response_mask, entropy=entropy, **kl, **kwargs
        )
        return loss, metrics

    return loss_fn


def _advantages(cfg: CriticFreeConfig, ro: CriticFreeRollout, rewards, kl_coef) -> jax.Array:
    choice = ALGORITHMS[cfg.algo]
    in_reward = kl_coef if cfg.kl_in == "reward" else 0.0
    if choice["baseline"] is None:  # REINFORCE++: KL-penalised reward-to-go, whitened
        return losses.reinforce_pp_advantages(
            rewards, ro.logps, ro.ref_logps, ro.response_mask, kl_coef=in_reward
        )
    # The sequence reward of Eq. 3: r - β Σ_t k1_t (0 when the KL sits in the loss).
    kl = losses.kl_estimate(ro.logps, ro.ref_logps, estimator=cfg.kl_estimator or "k1")
    total = rewards - in_reward * jnp.sum(jnp.where(ro.response_mask > 0, kl, 0.0), axis=1)
    grouped = total.reshape(-1, cfg.group_size)
    baseline = choice["baseline"] if cfg.baseline is None else cfg.baseline
    adv = losses.group_advantages(grouped, baseline=baseline, scale=choice["scale"])
    return jnp.broadcast_to(adv.reshape(-1, 1), ro.response_mask.shape)


def _reward(reward_fn: Reward):
    """`(state, rollout) -> scores [B]` of a JAX reward function or a reward model."""
    if isinstance(reward_fn, nn.Module):

        def rm(state, ro):
            params = _frozen(state, "reward")
            if params is None:
                raise ValueError("a reward model needs its params in state.frozen['reward']")
            tokens, mask = sequence(
                ro.query_tokens, ro.query_mask, ro.response_tokens, ro.response_mask
            )
            return reward_fn.apply({"params": params}, tokens, mask)

        return rm
    return lambda state, ro: reward_fn(
        ro.query_tokens, ro.query_mask, ro.response_tokens, ro.response_mask
    )


def _sample(model: nn.Module, cfg: CriticFreeConfig, reward_fn: Reward):
    """`rollout(state, prompt_batch) -> (state, CriticFreeRollout)`: samples and forwards, the
    reward when it is computed on the device (else zeros), advantages zeros."""
    reward = None if reward_fn is None else _reward(reward_fn)

    def rollout(state, batch: Batch):
        q_tok = jnp.asarray(batch["prompt_tokens"], jnp.int32)  # [P, L]
        q_mask = jnp.asarray(batch["prompt_mask"]).astype(jnp.int32)
        g, p = cfg.group_size, q_tok.shape[1]
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
        policy = _policy(state)
        gen = generate(
            model, policy, q_tok, q_mask, rng, **cfg.sampling.generate_kwargs(),
            eos_id=cfg.eos_id, pad_id=cfg.pad_id, num_samples=g,
        )  # fmt: skip
        r_tok = gen.tokens.reshape(-1, cfg.max_new_tokens)  # [P*G, N], prompt-major
        r_mask = gen.mask.reshape(-1, cfg.max_new_tokens).astype(jnp.int32)
        q_tok, q_mask = jnp.repeat(q_tok, g, axis=0), jnp.repeat(q_mask, g, axis=0)
        # The P*G rows stay split over the batch axes through the forwards below.
        r_tok, r_mask, q_tok, q_mask = sh.constrain_rows((r_tok, r_mask, q_tok, q_mask))
        tokens, mask = sequence(q_tok, q_mask, r_tok, r_mask)
        live = r_mask > 0
        logps, _ = response_logps_entropy(model, policy, tokens, mask, r_tok, p, cfg.temperature)
        ref = _reference(state)
        if ref is None and "kl_coef" in state.hparams:
            raise ValueError("hparams['kl_coef'] needs the reference params in state.frozen['ref']")
        ref_logps = jnp.zeros_like(logps)
        if ref is not None:
            ref_logps, _ = response_logps_entropy(
                model, ref, tokens, mask, r_tok, p, cfg.temperature
            )
        ro = CriticFreeRollout(
            query_tokens=q_tok,
            query_mask=q_mask,
            response_tokens=r_tok,
            response_mask=r_mask,
            logps=jnp.where(live, logps, 0.0),
            ref_logps=jnp.where(live, ref_logps, 0.0),
            scores=jnp.zeros(r_tok.shape[0], jnp.float32),
            advantages=jnp.zeros_like(logps),
        )
        if reward is not None:
            ro = ro.replace(scores=jnp.asarray(reward(state, ro), jnp.float32).reshape(-1))
        return state, jax.lax.stop_gradient(ro)

    return rollout


def make_critic_free_score(cfg: CriticFreeConfig):
    """`score(state, rollout) -> (state, rollout)`: the overlong penalty (if on), dynamic
    sampling (if on: the rollout keeps `num_groups` groups), the advantages, and the sampled
    batch's metrics in `rollout.stats` (`reward`, `reward_std_in_group` (mean over groups; 0
    means no signal), `response_length`, and with dynamic sampling `groups_informative` (of
    those sampled) and `groups_kept` (informative share of the kept slots)).

    `reward` and `reward_std_in_group` (the population std, ddof 0) read the raw task reward;
    `reward_shaped` (with the overlong penalty) and the two group shares read the reward the
    advantages use; `response_length` averages every sampled completion."""

    def score(state, ro: CriticFreeRollout):
        g = cfg.group_size
        lengths = jnp.sum(ro.response_mask, axis=1).astype(jnp.float32)
        rewards = ro.scores
        if cfg.overlong_cache:
            rewards = rewards + losses.overlong_penalty(
                lengths, max_length=cfg.max_new_tokens, cache_length=cfg.overlong_cache
            )
        grouped = rewards.reshape(-1, g)
        stats = {
            "reward": jnp.mean(ro.scores),
            "reward_std_in_group": jnp.mean(jnp.std(ro.scores.reshape(-1, g), axis=1)),
            "response_length": jnp.mean(lengths),
        }
        if cfg.overlong_cache:
            stats["reward_shaped"] = jnp.mean(rewards)
        if cfg.uses_dynamic_sampling:
            p = grouped.shape[0]
            k = cfg.num_groups or p
            if k > p:
                raise ValueError(f"num_groups={k} exceeds the {p} prompts of the batch")
            idx, valid = losses.select_groups(grouped, k)
            stats["groups_informative"] = jnp.mean(
                (jnp.max(grouped, 1) > jnp.min(grouped, 1)).astype(jnp.float32)
            )
            stats["groups_kept"] = jnp.mean(valid.astype(jnp.float32))

            def take(x):
                return x.reshape(p, g, *x.shape[1:])[idx].reshape(k * g, *x.shape[1:])

            ro = jax.tree.map(take, ro.replace(stats={}))
            rewards = take(rewards)
            keep = jnp.repeat(valid, g)[:, None]
            ro = ro.replace(response_mask=jnp.where(keep, ro.response_mask, 0))
        kl_coef = state.hparams.get("kl_coef", jnp.float32(0.0))
        live = ro.response_mask > 0
        adv = jnp.where(live, _advantages(cfg, ro, rewards, kl_coef), 0.0)
        return state, jax.lax.stop_gradient(ro.replace(advantages=adv, stats=stats))

    return score


def make_critic_free_rollout(model: nn.Module, reward_fn: Reward, cfg: CriticFreeConfig):
    """`rollout(state, prompt_batch) -> (state, CriticFreeRollout)` (state unchanged): sampled,
    rewarded (a JAX function or a `RewardModel`) and scored (`make_critic_free_score`)."""
    if reward_fn is None:
        raise ValueError(
            "a scored rollout needs a JAX reward or a RewardModel (see make_critic_free)"
        )
    sample, score = _sample(model, cfg, reward_fn), make_critic_free_score(cfg)

    def rollout(state, batch: Batch):
        return score(*sample(state, batch))

    return rollout


def make_critic_free_update(
    model: nn.Module, optimizer: optax.GradientTransformation, cfg: CriticFreeConfig
):
    """`update(state, rollout) -> (state, metrics)`: `epochs` passes of `num_minibatches`
    `make_step` updates (minibatches of whole groups, in order), metrics averaged, plus the
    rollout's `stats`."""
    loss = make_critic_free_loss(model, cfg)
    if isinstance(model, LoraTransformer):  # the adapters train; their base is in frozen
        check_no_dropout(model, "the critic-free methods")
        loss = lora_loss(loss)
    step = make_step(loss, optimizer)

    def update(state, ro: CriticFreeRollout):
        stats, ro = ro.stats, ro.replace(stats={})
        b = ro.scores.shape[0]
        k = cfg.num_minibatches
        if b % (k * cfg.group_size):
            raise ValueError(
                f"num_minibatches={k} must split the {b // cfg.group_size} groups of the rollout"
            )
        chunks = jax.tree.map(lambda x: x.reshape(k, b // k, *x.shape[1:]), ro)

        def epoch(state, _):
            return jax.lax.scan(step, state, chunks)

        state, metrics = jax.lax.scan(epoch, state, None, length=cfg.epochs)
        return state, {**jax.tree.map(jnp.mean, metrics), **stats}

    return update


def make_critic_free(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    cfg: CriticFreeConfig,
    *,
    reward_fn: Reward = None,
) -> CriticFreeFunctions:
    """All critic-free functions of one configuration. `reward_fn`: a JAX function on token ids,
    a `models.RewardModel` (params in `state.frozen["reward"]`), or None for a reward computed on
    the host between `rollout` and `score` (then `step` is None; see
    `stages.make_host_reward_ppo_step`, which takes these functions too)."""
    rollout = _sample(model, cfg, reward_fn)
    score = make_critic_free_score(cfg)
    update = make_critic_free_update(model, optimizer, cfg)
    step = None
    if reward_fn is not None:

        def step(state, batch: Batch):
            state, ro = rollout(state, batch)
            return update(*score(state, ro))

    return CriticFreeFunctions(rollout, score, update, step)


def make_critic_free_step(
    model: nn.Module,
    reward_fn: Reward,
    optimizer: optax.GradientTransformation,
    cfg: CriticFreeConfig,
):
    """`step(state, prompt_batch) -> (state, metrics)`: rollout, reward (a JAX function or a
    `RewardModel`), score and update in one program. Metrics: the update's (loss, pg_loss, kl,
    clip fractions, entropy, grad_norm, ...) plus the rollout's stats (`reward`,
    `reward_std_in_group`, `response_length`, dynamic sampling's `groups_informative` and
    `groups_kept`; see `make_critic_free_score`)."""
    if reward_fn is None:
        raise ValueError("a one-program step needs a JAX reward or a RewardModel")
    return make_critic_free(model, optimizer, cfg, reward_fn=reward_fn).step
