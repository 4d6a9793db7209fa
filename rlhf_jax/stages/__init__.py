"""The pipeline's stages as library functions: the drivers in `experiments/` and the frontier
experiment run the same code, with one RNG convention (`pairs.pair_rng`), one vocabulary rounding
(`handover.model_config`) and one accuracy function (`eval.preference_accuracy`).

    params, rows = stages.train_sft(task, cfg, params, workdir=..., mesh=mesh,
                                    schedule=stages.Schedule(steps=3000, batch_size=32,
                                                             learning_rate=1e-3), max_length=64)
    pairs = rlhf_jax.pairs.task_preference_pairs(task, model, params, ...)
    rm_params, rows, info = stages.train_reward_model(cfg, params, pairs, test_pairs, tok, ...)
    policy, rows, info = stages.train_dpo(cfg, params, pairs, tok, betas=0.1, ...)
    policy, rows = stages.train_ppo(cfg, params, task, reward_model=(cfg, rm_params), ...)
    policy, rows = stages.train_critic_free(cfg, params, loader, rl=train.CriticFreeConfig(...),
                                            reward_model=(cfg, rm_params), ...)

Each stage trains with `runner.fit` (resumable: rerun the same call), and a single run writes
its model for the next stage (`handover`).
"""

from rlhf_jax.stages.common import Schedule, check_vocab, preference_loader, prompt_loader
from rlhf_jax.stages.critic_free import train_critic_free
from rlhf_jax.stages.dpo import train_dpo
from rlhf_jax.stages.ppo import (
    HostReward,
    make_host_reward_ppo_step,
    make_host_reward_step,
    train_ppo,
)
from rlhf_jax.stages.reward_model import train_reward_model
from rlhf_jax.stages.sft import train_sft

__all__ = [
    "HostReward",
    "Schedule",
    "check_vocab",
    "make_host_reward_ppo_step",
    "make_host_reward_step",
    "train_critic_free",
    "preference_loader",
    "prompt_loader",
    "train_dpo",
    "train_ppo",
    "train_reward_model",
    "train_sft",
]
