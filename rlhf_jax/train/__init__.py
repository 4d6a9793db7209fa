"""Train state and pure steps `step(state, batch) -> (state, metrics)`: SFT, reward model, DPO
family, Unlikelihood, PPO, the critic-free methods (GRPO, Dr. GRPO, DAPO, GSPO, RLOO,
REINFORCE++), and precomputed reference log-probs. Every step is
`make_step(loss_fn, optimizer)` of a loss `loss_fn(params, batch, *, frozen, hparams) -> (loss,
metrics)`, so a user's loss trains the same way. Steps are un-jitted; drivers compile them with
`rlhf_jax.sharding`'s helper (donating the state)."""

from rlhf_jax.train.critic_free import (
    ALGORITHMS,
    CriticFreeConfig,
    CriticFreeRollout,
    make_critic_free_loss,
    make_critic_free_rollout,
    make_critic_free_step,
    make_critic_free_update,
)
from rlhf_jax.train.dpo import LOSS_TYPES, make_dpo_eval, make_dpo_loss, make_dpo_step, pair_logps
from rlhf_jax.train.ppo import (
    PPOConfig,
    PPOState,
    Rollout,
    create_ppo_state,
    make_ppo_rollout,
    make_ppo_score,
    penalize_missing_eos,
    response_token_lists,
    reward_model_fn,
    rollout_metrics,
)
from rlhf_jax.train.ppo_update import (
    PPOFunctions,
    make_ppo,
    make_ppo_loss,
    make_ppo_step,
    make_ppo_update,
)
from rlhf_jax.train.reference import (
    attach_reference,
    attach_reference_logps,
    attach_reference_to_records,
    compute_reference_logps,
    load_reference_logps,
    make_reference_fn,
    save_reference_logps,
)
from rlhf_jax.train.reward import make_reward_eval, make_reward_loss, make_reward_step
from rlhf_jax.train.sft import make_sft_eval, make_sft_loss, make_sft_step
from rlhf_jax.train.state import (
    HPARAM_RANGES,
    TrainState,
    apply_gradients,
    check_hparams,
    create_train_state,
    make_optimizer,
    rng_for_step,
    stack_states,
    unstack_state,
)
from rlhf_jax.train.step import make_eval, make_step, paired_optimizer
from rlhf_jax.train.unlikelihood import make_unlikelihood_loss, make_unlikelihood_step

__all__ = [
    "ALGORITHMS",
    "CriticFreeConfig",
    "CriticFreeRollout",
    "make_critic_free_loss",
    "make_critic_free_rollout",
    "make_critic_free_step",
    "make_critic_free_update",
    "HPARAM_RANGES",
    "LOSS_TYPES",
    "PPOConfig",
    "PPOFunctions",
    "PPOState",
    "Rollout",
    "TrainState",
    "apply_gradients",
    "attach_reference",
    "attach_reference_logps",
    "check_hparams",
    "attach_reference_to_records",
    "compute_reference_logps",
    "create_ppo_state",
    "create_train_state",
    "load_reference_logps",
    "make_dpo_eval",
    "make_dpo_loss",
    "make_dpo_step",
    "make_eval",
    "make_optimizer",
    "make_ppo",
    "make_ppo_loss",
    "make_ppo_rollout",
    "make_ppo_score",
    "make_ppo_step",
    "make_ppo_update",
    "make_reference_fn",
    "make_reward_eval",
    "make_reward_loss",
    "make_reward_step",
    "make_sft_eval",
    "make_sft_loss",
    "make_sft_step",
    "make_step",
    "make_unlikelihood_loss",
    "make_unlikelihood_step",
    "pair_logps",
    "paired_optimizer",
    "penalize_missing_eos",
    "response_token_lists",
    "reward_model_fn",
    "rng_for_step",
    "rollout_metrics",
    "save_reference_logps",
    "stack_states",
    "unstack_state",
]
