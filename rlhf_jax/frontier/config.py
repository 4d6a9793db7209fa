"""The frontier experiment's configuration: every size chosen so that the default (3 seeds) runs
in under 15 minutes on a 2-core CPU, and a `tiny` preset (2 seeds) for tests and notebooks
(about two minutes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlhf_jax.data.tasks import default_data_dir

# `default_data_dir` takes a file two levels below the repository (as experiments/x.py is).
_REPO_ANCHOR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class FrontierConfig:
    """The frontier experiment (all sizes chosen for a 2-core CPU by default); the command line
    (experiments/frontier.py) adds the multi-host flags."""

    workdir: str = "runs/frontier"
    data_dir: str = default_data_dir(_REPO_ANCHOR)  # prepared synthetic task
    seeds: tuple[int, ...] = (0, 1, 2)  # replications after the SFT model (its seed: the first)
    confidence: float = 0.95  # level of the Student-t intervals over seeds
    mesh: str = "data=-1"  # data=D,fsdp=F,tensor=T (-1: the remaining devices)
    progress: bool = True  # tqdm bars
    compilation_cache: bool = True  # JAX's persistent cache in WORKDIR/jax_cache: seeds > 1 reuse
    # the first seed's compiled programs (unless a cache directory is configured already)
    # The policy: a GPT-2-shaped decoder (vocabulary = the task tokenizer's).
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_prompt_length: int = 8  # prompts are 2-8 token prefixes
    max_new_tokens: int = 24  # completion cap; sequences are prompt + completion <= 32 tokens
    temperature: float = 1.0  # sampling temperature everywhere (pairs, PPO, evaluation)
    # SFT on the training reviews.
    sft_steps: int = 400
    sft_batch_size: int = 64
    sft_lr: float = 2e-3
    # Preference pairs and the reward model.
    pair_prompts: int = 2048  # training prefixes, completions_per_prompt samples each
    heldout_prompts: int = 256  # test prefixes whose pairs measure the RM's accuracy
    completions_per_prompt: int = 4
    rm_steps: int = 250
    rm_batch_size: int = 32
    rm_lr: float = 5e-4
    # Evaluation.
    eval_prompts: int = 256  # held-out test prompts of every (KL, reward) point
    checkpoint_every: int = 100  # steps between checkpoints inside a stage (resume)
    # DPO.
    dpo_betas: tuple[float, ...] = (0.1, 0.3, 1.0)
    dpo_steps: int = 160
    dpo_batch_size: int = 32
    dpo_lr: float = 3e-4
    dpo_eval_every: int = 20
    timing_steps: int = 3  # steps timed for the vmapped-vs-one-by-one comparison
    # PPO (learned reward model; rewards normalised to mean 0, std 1 on SFT samples) and PPO-GT.
    ppo_kl_coefs: tuple[float, ...] = (0.05, 0.2)
    ppo_gt_kl_coef: float = 0.05
    ppo_steps: int = 40
    ppo_batch_size: int = 64
    ppo_lr: float = 3e-4
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    ppo_eval_every: int = 5
    # GRPO (β k3 in the loss) and RLOO (β k1 in the reward) on the learned reward model, each a
    # KL-coefficient sweep as one vmapped program; cf_prompts prompts x cf_group_size samples.
    critic_free: tuple[str, ...] = ("grpo", "rloo")
    cf_kl_coefs: tuple[float, ...] = (0.05,)
    cf_steps: int = 40
    cf_prompts: int = 16
    cf_group_size: int = 4
    cf_lr: float = 3e-4
    cf_eval_every: int = 5
    # Preferred-FT (alpha = 0) and Unlikelihood.
    unlikelihood_alphas: tuple[float, ...] = (0.5,)
    ft_steps: int = 60
    ft_batch_size: int = 32
    ft_lr: float = 3e-4
    ft_eval_every: int = 20
    # Best-of-N with the learned reward model.
    bon_ns: tuple[int, ...] = (1, 4, 16, 64)
    bon_prompts: int = 128
    # The summary table: best reward at KL <= each threshold (nats).
    kl_thresholds: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)


PRESETS = {
    "default": FrontierConfig(),
    "tiny": FrontierConfig(
        workdir="runs/frontier_tiny",
        seeds=(0, 1),
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_new_tokens=12,
        sft_steps=60,
        sft_batch_size=32,
        sft_lr=3e-3,
        pair_prompts=64,
        heldout_prompts=32,
        rm_steps=20,
        rm_batch_size=16,
        eval_prompts=32,
        checkpoint_every=1000,
        dpo_betas=(0.1, 1.0),
        dpo_steps=10,
        dpo_batch_size=16,
        dpo_eval_every=5,
        timing_steps=2,
        ppo_kl_coefs=(0.05, 0.2),
        ppo_steps=4,
        ppo_batch_size=16,
        ppo_eval_every=2,
        ppo_minibatches=1,
        cf_kl_coefs=(0.05,),
        cf_steps=4,
        cf_prompts=4,
        cf_eval_every=2,
        ft_steps=6,
        ft_batch_size=16,
        ft_eval_every=3,
        bon_ns=(1, 4),
        bon_prompts=16,
        kl_thresholds=(0.5, 1.0, 2.0),
    ),
}
