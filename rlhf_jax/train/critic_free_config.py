"""The critic-free methods' configuration: `ALGORITHMS` (each method's baseline, scale, ratio,
aggregation and clip range) and `CriticFreeConfig` (one method and its sampling), checked when
built; `train.critic_free` builds the compiled iteration from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rlhf_jax import losses
from rlhf_jax.sampling import SamplingConfig

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
# DAPO's dynamic sampling is on by default for "dapo" (`CriticFreeConfig.dynamic_sampling`).
DYNAMIC_SAMPLING_DEFAULT = ("dapo",)


@dataclasses.dataclass(frozen=True)
class CriticFreeConfig:
    """One critic-free method and its sampling.

    Attributes:
      algo: a name of `ALGORITHMS`; it sets the baseline, scale, ratio, aggregation and clip
        range (explicit `clip_eps_low` / `clip_eps_high` override the algorithm's).
      group_size: G completions per prompt (>= 2).
      kl_in: "loss" (β k3 in the loss, GRPO's form) or "reward" (r - β Σ k1, Eq. 3); β is the
        state's `hparams["kl_coef"]`, the reference `state.frozen["ref"]` (a state without it
        has no KL term and no reference forward).
      epochs, num_minibatches: updates per rollout (minibatches split whole groups).
      dynamic_sampling: DAPO's dynamic sampling: train on the first `num_groups` groups whose
        rewards are not all equal (`losses.select_groups`); slots left when fewer are
        informative train with weight 0. None: on for "dapo", off otherwise.
      num_groups: groups kept by dynamic sampling (default: all the prompts of the batch, so
        only the uninformative ones are dropped); sample more prompts than this to refill.
      overlong_cache: DAPO's soft overlong punishment (`losses.overlong_penalty`) over the last
        `overlong_cache` of `max_new_tokens`, added to the reward; None: off.
      baseline: the group baseline instead of the algorithm's: "mean", "leave_one_out" or a
        function `rewards [P, G] -> baselines [P, G]` (`losses.group_advantages`); None: the
        algorithm's (REINFORCE++ has none and takes no other).
      kl_estimator: the per-token KL estimate instead of the method's (k3 in the loss, k1 summed
        into the reward): "k1", "k2", "k3" or a function `(logps, ref_logps) -> [B, T]`
        (`losses.kl_estimate`); None: the method's.
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
    dynamic_sampling: bool | None = None
    num_groups: int | None = None
    overlong_cache: int | None = None
    baseline: str | Callable[[Any], Any] | None = None
    kl_estimator: str | Callable[[Any, Any], Any] | None = None

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
            ("num_groups", self.num_groups is None or self.num_groups >= 1, ">= 1"),
            (
                "overlong_cache",
                self.overlong_cache is None or 1 <= self.overlong_cache <= self.max_new_tokens,
                f"in [1, max_new_tokens={self.max_new_tokens}]",
            ),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"{name} must be {accepted}, got {getattr(self, name)!r}")
        SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)  # checks
        b, k = self.baseline, self.kl_estimator
        if b is not None and not (callable(b) or b in ("mean", "leave_one_out")):
            raise ValueError(f"baseline must be 'mean', 'leave_one_out' or a function, got {b!r}")
        if k is not None and not (callable(k) or k in losses.KL_ESTIMATORS):
            raise ValueError(
                f"kl_estimator must be one of {losses.KL_ESTIMATORS} or a function, got {k!r}"
            )
        if ALGORITHMS[self.algo]["baseline"] is None and (
            b is not None or (k is not None and self.kl_in == "reward")
        ):
            raise ValueError(
                "reinforce_pp whitens a k1-penalised reward-to-go: it takes no baseline, and no "
                "kl_estimator with kl_in='reward'"
            )
        if self.num_groups is not None and not self.uses_dynamic_sampling:
            raise ValueError("num_groups applies with dynamic_sampling; turn it on or drop it")
        if self.num_groups is not None and self.num_groups % self.num_minibatches:
            raise ValueError(
                f"num_minibatches={self.num_minibatches} must split num_groups={self.num_groups}"
            )

    @property
    def uses_dynamic_sampling(self) -> bool:
        if self.dynamic_sampling is None:
            return self.algo in DYNAMIC_SAMPLING_DEFAULT
        return self.dynamic_sampling

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
