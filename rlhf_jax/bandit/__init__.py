"""Tabular contextual bandit: the closed-form testbed for the KL-regularized objective.

`bandit.core` holds the bandit, the optimum of Eq. 3 in closed form (Eq. 4), the exact objective
and Bradley-Terry preference sampling (Eq. 1); `bandit.training` every learner as one pure
`train_policy` (DPO family, policy gradient / PPO, the critic-free methods) whose fixed point is
checked against π*.

    bandit = random_bandit(jax.random.key(0), 4, 8)                      # X = 4, K = 8 arms
    pairs = expected_preference_pairs(bandit.ref_probs, bandit.rewards)  # Eq. 1, N -> infinity
    result = train_policy("dpo", bandit, pairs, 0.1, jax.random.key(1), steps=1000)
    pi_star = optimal_policy(bandit.ref_probs, bandit.rewards, 0.1)     # Eq. 4
    tv_distance(jax.nn.softmax(result.logits), pi_star)                 # [X]: TV to pi*
"""

from rlhf_jax.bandit.core import (
    Bandit,
    Preferences,
    bradley_terry_preferences,
    evaluate_policy,
    expected_preference_pairs,
    inverse_cdf,
    ipo_fixed_point,
    k3_in_loss_fixed_point,
    kl_regularized_objective,
    optimal_policy,
    optimal_value,
    preference_weights,
    random_bandit,
    tv_distance,
)
from rlhf_jax.bandit.training import (
    CRITIC_FREE_METHODS,
    KL_PLACEMENTS,
    METHODS,
    PREFERENCE_METHODS,
    RL_METHODS,
    TrainResult,
    train_policy,
)

__all__ = [
    "CRITIC_FREE_METHODS",
    "KL_PLACEMENTS",
    "METHODS",
    "PREFERENCE_METHODS",
    "RL_METHODS",
    "Bandit",
    "Preferences",
    "TrainResult",
    "bradley_terry_preferences",
    "evaluate_policy",
    "expected_preference_pairs",
    "inverse_cdf",
    "ipo_fixed_point",
    "k3_in_loss_fixed_point",
    "kl_regularized_objective",
    "optimal_policy",
    "optimal_value",
    "preference_weights",
    "random_bandit",
    "train_policy",
    "tv_distance",
]
