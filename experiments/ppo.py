"""PPO on the KL-regularized objective (seed eq. 3) with a learned or the ground-truth reward.

    .venv/bin/python experiments/ppo.py --preset tiny --init-from runs/sft_tiny \\
        --reward runs/rm_tiny --workdir runs/ppo_tiny
    .venv/bin/python experiments/ppo.py --init-from runs/sft --reward runs/rm --kl-coef 0.05
    .venv/bin/python experiments/ppo.py --init-from runs/sft --reward ground-truth --target-kl 6

The policy and the frozen reference start from --init-from (the SFT workdir or an HF GPT-2
folder); each iteration samples completions of a batch of training prefixes, scores them, and
runs `ppo_epochs` x `num_minibatches` clipped updates of policy and critic (`train.make_ppo`).
--reward names a reward-model workdir (reward_model.py; the critic starts from its trunk, the
whole iteration is one compiled program) or `ground-truth` (PPO-GT: VADER on the decoded texts,
computed on the host between the compiled rollout and the compiled score + update; the critic
starts from the policy). --kl-coef is the initial KL coefficient; --target-kl makes it adaptive
(Ziegler et al. 2019).

Writes into WORKDIR: run_config.json, metrics.jsonl (step, loss, score, kl_exact, kl_k1, kl_k3,
kl_coef, clipfrac, approx_kl, entropy, value_error, ...), tensorboard/, checkpoints/, and when
finished hf/ (the policy) and model_config.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from rlhf_jax import models, runner, sharding, train
from rlhf_jax.data import synthetic

GROUND_TRUTH = "ground-truth"


@dataclasses.dataclass(frozen=True)
class Config:
    """PPO with a reward model or the ground-truth reward."""

    workdir: str = "runs/ppo"
    data_dir: str = runner.default_data_dir(__file__)  # prepared synthetic task (cached)
    init_from: str | None = None  # the SFT workdir (or HF GPT-2 folder): policy and reference
    reward: str = GROUND_TRUTH  # a reward-model workdir, or "ground-truth" (PPO-GT)
    kl_coef: float = 0.05  # initial KL coefficient beta
    target_kl: float | None = None  # adaptive KL controller target (per sequence); None: fixed
    kl_horizon: float = 10000.0
    max_new_tokens: int = 48
    temperature: float = 1.0
    max_prompt_length: int = 8
    ppo_epochs: int = 4
    num_minibatches: int = 1
    missing_eos_penalty: float | None = None  # subtracted from the score of unfinished samples
    steps: int = 200  # PPO iterations (rollout + update)
    batch_size: int = 64  # prompts per iteration, global
    learning_rate: float = 1e-5
    value_learning_rate: float = 1e-5
    log_every: int = 5
    checkpoint_every: int = 50
    seed: int = 0
    mesh: str = "data=-1"  # data=D,fsdp=F,tensor=T (-1: the remaining devices)


PRESETS = {
    "default": Config(),
    "tiny": Config(
        workdir="runs/ppo_tiny",
        max_new_tokens=16,
        ppo_epochs=2,
        steps=4,
        batch_size=16,
        learning_rate=1e-4,
        value_learning_rate=1e-4,
        log_every=2,
        checkpoint_every=4,
    ),
}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the command line `argv`; returns the metrics rows."""
    config = runner.parse_config(Config, PRESETS, argv, description=__doc__)
    sharding.init_distributed()
    mesh = runner.resolve_mesh(config.mesh)
    local_batch = runner.check_batch(config.batch_size, mesh)
    if config.batch_size % config.num_minibatches:
        raise runner.ConfigError(
            f"--batch-size {config.batch_size} is not divisible by --num-minibatches "
            f"{config.num_minibatches}"
        )
    if not config.init_from:
        raise runner.ConfigError(
            "PPO starts from (and regularises towards) the SFT model: pass --init-from"
        )
    runner.write_run_config(config.workdir, config)
    task = synthetic.load_task(synthetic.prepare(config.data_dir))
    tok = runner.task_tokenizer(task)
    cfg, params = runner.load_init_params(config.init_from)
    max_length = config.max_prompt_length + config.max_new_tokens
    runner.check_model(cfg, tok, max_length=max_length)
    rng_value = jax.random.PRNGKey(config.seed)
    if config.reward == GROUND_TRUTH:
        value_cfg, reward_params, reward_fn = cfg, None, None
        value_params = models.init_value_params(cfg, rng_value, params)
    else:
        value_cfg, reward_params = runner.load_reward_model(config.reward)
        reward_fn = train.reward_model_fn(models.RewardModel(value_cfg))
        value_params = models.init_value_params(value_cfg, rng_value, reward_params["transformer"])

    ppo = train.PPOConfig(
        kl_coef=config.kl_coef,
        kl_target=config.target_kl,
        kl_horizon=config.kl_horizon,
        ppo_epochs=config.ppo_epochs,
        num_minibatches=config.num_minibatches,
        missing_eos_penalty=config.missing_eos_penalty,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    opts = (
        train.make_optimizer(config.learning_rate),
        train.make_optimizer(config.value_learning_rate),
    )
    nets = (models.Transformer(cfg), models.ValueModel(value_cfg))
    fns = train.make_ppo(*nets, *opts, ppo, reward_fn=reward_fn)
    state = train.create_ppo_state(
        ppo,
        policy_params=params,
        value_params=value_params,
        ref_params=params,
        policy_optimizer=opts[0],
        value_optimizer=opts[1],
        rng=config.seed,
        reward_params=reward_params,
    )
    loader = runner.task_loaders(
        task,
        "prompt",
        batch_size=local_batch,
        max_length=max_length,
        max_prompt_length=config.max_prompt_length,
        seed=config.seed,
    )
    if reward_fn is None:  # PPO-GT: the reward is a host function of the decoded text
        step, jit = runner.make_text_reward_ppo_step(fns, task.reward_fn, tok, mesh), False
    else:
        step, jit = fns.step, True
    state, rows = runner.fit(
        step,
        state,
        loader,
        workdir=config.workdir,
        steps=config.steps,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        mesh=mesh,
        desc="ppo" if jit else "ppo-gt",
        jit=jit,
    )
    runner.save_lm(config.workdir, cfg, state.policy_params, tokenizer=tok)
    if rows:
        last = rows[-1]
        print(f"ppo: step {last['step']} score {last['score']:.3f} kl {last['kl_exact']:.3f}")
    return rows


if __name__ == "__main__":
    runner.run_cli(main)
