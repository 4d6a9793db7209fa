"""Critic-free RL on a language model: GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE++ as one
compiled iteration.

    rollout(state, prompt_batch) -> (state, CriticFreeRollout)   G completions per prompt
                                              (`generate(num_samples=G)`), the JAX reward on
                                              token ids, teacher-forced policy (and reference)
                                              log-probs, the method's advantages
    update(state, rollout) -> (state, metrics)    `epochs` x `num_minibatches` steps of
                                              `make_step(loss, optimizer)` with the loss
                                              `losses.policy_gradient_loss`
    step = make_critic_free_step(...)         both, one program: no host round trip

The state is a `TrainState`: `params` the policy, `frozen` the reference (used when
`kl_coef > 0` or by REINFORCE++), `hparams["kl_coef"]`, `rng`. The reward is a JAX function
`reward_fn(prompt_tokens [B, P], prompt_mask, response_tokens [B, N], response_mask) -> [B]`
(e.g. `data.arithmetic.exact_match_reward`). Rows of the rollout are prompt-major: row p * G + g
is completion g of prompt p.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses
from rlhf_jax.sampling import SamplingConfig, generate
from rlhf_jax.train.ppo import _policy_forward, _sequence
from rlhf_jax.train.step import make_step

Batch = Mapping[str, jax.Array]
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

# algorithm -> its choices (losses.critic_free's module doc); "advantages": group or reinforce_pp
ALGORITHMS: dict[str, dict[str, Any]] = {
    "grpo": dict(baseline="mean", scale="std", ratio="token", aggregation="sequence_mean"),
    "dr_grpo": dict(baseline="mean", scale="none", ratio="token", aggregation="sequence_sum_norm"),
    "dapo": dict(
        baseline="mean", scale="std", ratio="token", aggregation="token_mean", clip_eps_high=0.28
    ),
    "gspo": dict(
        baseline="mean",
        scale="std",
        ratio="sequence",
        aggregation="sequence_mean",
        clip_eps_low=3e-4,
        clip_eps_high=4e-4,
    ),  # fmt: skip
    "rloo": dict(
        baseline="leave_one_out", scale="none", ratio="token", aggregation="sequence_mean"
    ),
    "reinforce_pp": dict(baseline=None, scale=None, ratio="token", aggregation="token_mean"),
}


@dataclasses.dataclass(frozen=True)
class CriticFreeConfig:
    """One critic-free method and its sampling.

    Attributes:
      algo: a name of `ALGORITHMS`; it sets the baseline, scale, ratio, aggregation and clip
        range (explicit `clip_eps_low` / `clip_eps_high` override the algorithm's).
      group_size: G completions per prompt (>= 2).
      kl_in: "loss" (β k3 in the loss, GRPO's form) or "reward" (r - β Σ k1, Eq. 3); β is the
        state's `hparams["kl_coef"]`, the reference `state.frozen` (a state without `frozen`
        has no KL term and no reference forward).
      epochs, num_minibatches: updates per rollout (minibatches split whole groups).
      temperature, max_new_tokens, top_k, top_p, eos_id, pad_id: sampling.
    """

    algo: str = "grpo"
    group_size: int = 8
    kl_in: str = "loss"
    clip_eps_low: float | None = None
    clip_eps_high: float | None = None
    epochs: int = 1
    num_minibatches: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 16
    top_k: int | None = None
    top_p: float | None = None
    eos_id: int | None = None
    pad_id: int = 0

    def __post_init__(self):
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {tuple(ALGORITHMS)}, got {self.algo!r}")
        if self.kl_in not in ("loss", "reward"):
            raise ValueError(f"kl_in must be 'loss' or 'reward', got {self.kl_in!r}")
        checks = [
            ("group_size", self.group_size >= 2, ">= 2"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("num_minibatches", self.num_minibatches >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
            ("clip_eps_low", self.clip_eps_low is None or self.clip_eps_low > 0, "> 0"),
            ("clip_eps_high", self.clip_eps_high is None or self.clip_eps_high > 0, "> 0"),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"{name} must be {accepted}, got {getattr(self, name)!r}")
        SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)  # checks

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `losses.policy_gradient_loss` this method uses."""
        choice = ALGORITHMS[self.algo]
        low = self.clip_eps_low or choice.get("clip_eps_low", 0.2)
        high = self.clip_eps_high or choice.get("clip_eps_high")
        return dict(
            clip_eps_low=low,
            clip_eps_high=high,
            ratio=choice["ratio"],
            aggregation=choice["aggregation"],
            max_tokens=self.max_new_tokens,
        )


@flax.struct.dataclass
class CriticFreeRollout:
    """One scored batch of P * G completions (prompt-major rows), all [B, ...] with B = P * G."""

    query_tokens: jax.Array  # [B, P] left-padded
    query_mask: jax.Array  # [B, P]
    response_tokens: jax.Array  # [B, N]
    response_mask: jax.Array  # [B, N]
    logps: jax.Array  # [B, N] teacher-forced log pi_old (at the sampling temperature)
    ref_logps: jax.Array  # [B, N] log pi_ref (zeros when unused)
    scores: jax.Array  # [B] the reward
    advantages: jax.Array  # [B, N]


def make_critic_free_loss(model: nn.Module, cfg: CriticFreeConfig):
    """`loss_fn(params, rollout_minibatch, *, frozen, hparams)` of the step contract."""
    kwargs = cfg.loss_kwargs()

    def loss_fn(params, ro: CriticFreeRollout, *, frozen, hparams):
        del frozen
        tokens, mask = _sequence(
            ro.query_tokens, ro.query_mask, ro.response_tokens, ro.response_mask
        )
        p = ro.query_tokens.shape[1]
        logits, logps = _policy_forward(
            model, params, tokens, mask, ro.response_tokens, p, cfg.temperature
        )
        kl = {}
        if cfg.kl_in == "loss":
            kl = dict(ref_logps=ro.ref_logps, kl_coef=hparams.get("kl_coef", 0.0))
        loss, metrics = losses.policy_gradient_loss(
            logps, ro.logps, ro.advantages, ro.response_mask, logits=logits, **kl, **kwargs
        )
        return loss, metrics

    return loss_fn


def _advantages(cfg: CriticFreeConfig, ro: CriticFreeRollout, kl_coef) -> jax.Array:
    choice = ALGORITHMS[cfg.algo]
    in_reward = kl_coef if cfg.kl_in == "reward" else 0.0
    if choice["baseline"] is None:  # REINFORCE++: KL-penalised reward-to-go, whitened
        return losses.reinforce_pp_advantages(
            ro.scores, ro.logps, ro.ref_logps, ro.response_mask, kl_coef=in_reward
        )
    # The sequence reward of Eq. 3: r - β Σ_t k1_t (0 when the KL sits in the loss).
    kl = losses.kl_estimate(ro.logps, ro.ref_logps, estimator="k1")
    total = ro.scores - in_reward * jnp.sum(jnp.where(ro.response_mask > 0, kl, 0.0), axis=1)
    grouped = total.reshape(-1, cfg.group_size)
    adv = losses.group_advantages(grouped, baseline=choice["baseline"], scale=choice["scale"])
    return jnp.broadcast_to(adv.reshape(-1, 1), ro.response_mask.shape)


def make_critic_free_rollout(model: nn.Module, reward_fn: RewardFn, cfg: CriticFreeConfig):
    """`rollout(state, prompt_batch) -> (state, CriticFreeRollout)` (state unchanged)."""

    def rollout(state, batch: Batch):
        q_tok = jnp.asarray(batch["prompt_tokens"], jnp.int32)  # [P, L]
        q_mask = jnp.asarray(batch["prompt_mask"]).astype(jnp.int32)
        g, p = cfg.group_size, q_tok.shape[1]
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
        gen = generate(
            model, state.params, q_tok, q_mask, rng, **cfg.sampling.generate_kwargs(),
            eos_id=cfg.eos_id, pad_id=cfg.pad_id, num_samples=g,
        )  # fmt: skip
        r_tok = gen.tokens.reshape(-1, cfg.max_new_tokens)  # [P*G, N], prompt-major
        r_mask = gen.mask.reshape(-1, cfg.max_new_tokens).astype(jnp.int32)
        q_tok, q_mask = jnp.repeat(q_tok, g, axis=0), jnp.repeat(q_mask, g, axis=0)
        tokens, mask = _sequence(q_tok, q_mask, r_tok, r_mask)
        live = r_mask > 0
        _, logps = _policy_forward(model, state.params, tokens, mask, r_tok, p, cfg.temperature)
        kl_coef = state.hparams.get("kl_coef", jnp.float32(0.0))
        if state.frozen is None and "kl_coef" in state.hparams:
            raise ValueError("hparams['kl_coef'] needs the reference params in state.frozen")
        ref_logps = jnp.zeros_like(logps)
        if state.frozen is not None:
            _, ref_logps = _policy_forward(
                model, state.frozen, tokens, mask, r_tok, p, cfg.temperature
            )
        ro = CriticFreeRollout(
            query_tokens=q_tok,
            query_mask=q_mask,
            response_tokens=r_tok,
            response_mask=r_mask,
            logps=jnp.where(live, logps, 0.0),
            ref_logps=jnp.where(live, ref_logps, 0.0),
            scores=jnp.asarray(reward_fn(q_tok, q_mask, r_tok, r_mask), jnp.float32),
            advantages=jnp.zeros_like(logps),
        )
        ro = ro.replace(advantages=jnp.where(live, _advantages(cfg, ro, kl_coef), 0.0))
        return state, jax.lax.stop_gradient(ro)

    return rollout


def make_critic_free_update(
    model: nn.Module, optimizer: optax.GradientTransformation, cfg: CriticFreeConfig
):
    """`update(state, rollout) -> (state, metrics)`: `epochs` passes of `num_minibatches`
    `make_step` updates (minibatches of whole groups, in order), metrics averaged."""
    step = make_step(make_critic_free_loss(model, cfg), optimizer)

    def update(state, ro: CriticFreeRollout):
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
        return state, jax.tree.map(jnp.mean, metrics)

    return update


def make_critic_free_step(
    model: nn.Module,
    reward_fn: RewardFn,
    optimizer: optax.GradientTransformation,
    cfg: CriticFreeConfig,
):
    """`step(state, prompt_batch) -> (state, metrics)`: rollout, JAX reward, update in one
    program. Metrics: the update's (loss, pg_loss, kl, clip fractions, entropy, grad_norm, ...)
    plus `reward` (mean score), `reward_std_in_group` (mean over groups; 0 means no signal),
    `response_length`."""
    rollout = make_critic_free_rollout(model, reward_fn, cfg)
    update = make_critic_free_update(model, optimizer, cfg)

    def step(state, batch: Batch):
        state, ro = rollout(state, batch)
        state, metrics = update(state, ro)
        grouped = ro.scores.reshape(-1, cfg.group_size)
        metrics = {
            **metrics,
            "reward": jnp.mean(ro.scores),
            "reward_std_in_group": jnp.mean(jnp.std(grouped, axis=1)),
            "response_length": jnp.mean(jnp.sum(ro.response_mask, axis=1).astype(jnp.float32)),
        }
        return state, metrics

    return step
