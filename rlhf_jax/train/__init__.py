"""Train state and pure steps `step(state, batch) -> (state, metrics)`: SFT, reward model, DPO
family, PPO, and precomputed reference log-probs. Steps are un-jitted; drivers compile them with
`rlhf_jax.sharding`'s helper (donating the state)."""

from rlhf_jax.train.dpo import LOSS_TYPES, make_dpo_eval, make_dpo_loss, make_dpo_step, pair_logps
from rlhf_jax.train.ppo import (
    PPOConfig,
    PPOFunctions,
    PPOState,
    Rollout,
    create_ppo_state,
    make_ppo,
    make_ppo_loss,
    make_ppo_rollout,
    make_ppo_score,
    make_ppo_step,
    make_ppo_update,
    penalize_missing_eos,
    response_token_lists,
    reward_model_fn,
    rollout_metrics,
)
from rlhf_jax.train.reference import (
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
    TrainState,
    apply_gradients,
    create_train_state,
    make_optimizer,
    rng_for_step,
    stack_states,
    unstack_state,
)

__all__ = [
    "LOSS_TYPES",
    "PPOConfig",
    "PPOFunctions",
    "PPOState",
    "Rollout",
    "TrainState",
    "apply_gradients",
    "attach_reference_logps",
    "attach_reference_to_records",
    "compute_reference_logps",
    "create_ppo_state",
    "create_train_state",
    "load_reference_logps",
    "make_dpo_eval",
    "make_dpo_loss",
    "make_dpo_step",
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
    "pair_logps",
    "penalize_missing_eos",
    "response_token_lists",
    "reward_model_fn",
    "rng_for_step",
    "rollout_metrics",
    "save_reference_logps",
    "stack_states",
    "unstack_state",
]
