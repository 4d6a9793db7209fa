"""Pure loss functions of arrays: log-probs, SFT, reward (Eq. 2), KL (Eq. 3), PPO, DPO family
(CPO included), critic-free policy gradients (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++), KTO
and the generalized JSD of on-policy distillation.

All functions are un-jitted, compute in float32 and return per-example values unless stated.
"""

from rlhf_jax.losses.critic_free import (
    AGGREGATIONS,
    BASELINES,
    RATIOS,
    SCALES,
    group_advantages,
    overlong_penalty,
    policy_gradient_loss,
    reinforce_pp_advantages,
    reward_to_go,
    select_groups,
)
from rlhf_jax.losses.dpo import (
    DPO_LOSS_TYPES,
    PAIRWISE_LOSSES,
    PairwiseLoss,
    cpo_loss,
    dpo_loss,
    orpo_odds_ratio_loss,
    pairwise_loss,
    simpo_loss,
    unlikelihood_loss,
)
from rlhf_jax.losses.kl import (
    KL_ESTIMATORS,
    adaptive_kl_coef,
    chunked_logps_and_exact_kl,
    exact_kl,
    kl_estimate,
    kl_penalized_rewards,
)
from rlhf_jax.losses.logprobs import (
    chunked_target_logps,
    entropy_from_logits,
    sequence_logps,
    sft_loss,
    token_logps,
)
from rlhf_jax.losses.ppo import gae, ppo_policy_loss, ppo_value_loss, whiten
from rlhf_jax.losses.reward import bradley_terry_loss
from rlhf_jax.losses.unpaired import generalized_jsd, kto_loss, kto_reference_point

__all__ = [
    "AGGREGATIONS",
    "BASELINES",
    "RATIOS",
    "SCALES",
    "group_advantages",
    "overlong_penalty",
    "policy_gradient_loss",
    "reinforce_pp_advantages",
    "reward_to_go",
    "select_groups",
    "DPO_LOSS_TYPES",
    "KL_ESTIMATORS",
    "PAIRWISE_LOSSES",
    "PairwiseLoss",
    "adaptive_kl_coef",
    "bradley_terry_loss",
    "cpo_loss",
    "generalized_jsd",
    "kto_loss",
    "kto_reference_point",
    "dpo_loss",
    "entropy_from_logits",
    "exact_kl",
    "gae",
    "kl_estimate",
    "kl_penalized_rewards",
    "orpo_odds_ratio_loss",
    "pairwise_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sequence_logps",
    "sft_loss",
    "simpo_loss",
    "token_logps",
    "chunked_logps_and_exact_kl",
    "chunked_target_logps",
    "unlikelihood_loss",
    "whiten",
]
