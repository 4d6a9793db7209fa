"""PPO on the KL-regularized objective (seed eq. 3) with a learned or the ground-truth reward.

    .venv/bin/python experiments/ppo.py --preset tiny --init-from runs/sft_tiny \\
        --reward runs/rm_tiny --workdir runs/ppo_tiny
    .venv/bin/python experiments/ppo.py --init-from runs/sft --reward runs/rm --kl-coef 0.05
    .venv/bin/python experiments/ppo.py --init-from runs/sft --reward ground-truth --target-kl 6
    .venv/bin/python experiments/ppo.py --init-from MODEL --dataset gsm8k.jsonl \\
        --columns prompt=question --reward-fn my_rewards:exact_match my_rewards:format_ok

The policy and the frozen reference start from --init-from (the SFT workdir or an HF folder of any
supported family); each iteration samples completions of a batch of training prefixes, scores them,
and runs `ppo_epochs` x `num_minibatches` clipped updates of policy and critic (`train.make_ppo`).
--reward names a reward-model workdir (reward_model.py; the critic starts from its trunk, the
whole iteration is one compiled program) or `ground-truth` (PPO-GT: VADER on the decoded texts,
computed on the host between the compiled rollout and the compiled score + update; the critic
starts from the policy). --kl-coef is the initial KL coefficient; --target-kl makes it adaptive
(Ziegler et al. 2019).

With --dataset (prompt-only or prompt-completion rows in TRL's formats, text or conversational;
docs/your_data.md) the prompts are the dataset's, tokenized with --init-from's own tokenizer and
chat template, and the reward is --reward-fn: Python functions with TRL's signature
`fn(prompts, completions, **columns) -> list[float | None]` that see the dataset's other columns,
summed with --reward-weights; each one's mean is logged as rewards/<name> and every scored row
goes to WORKDIR/completions.jsonl (or --reward, a reward-model workdir).

Writes into WORKDIR: run_config.json, metrics.jsonl (step, loss, score, kl_exact, kl_k1, kl_k3,
kl_coef, clipfrac, approx_kl, entropy, value_error, ...), tensorboard/, checkpoints/, and when
finished hf/ (the policy) and model_config.json. With --lora-rank R the policy trains LoRA
adapters on the frozen SFT model, which is also the reference (one copy; --quantize int8|nf4
stores it quantized: QLoRA), and the critic trains adapters and its head on the reward model's
trunk (with the ground truth: on the same base); adapter/ holds the policy's adapters in PEFT's
format and hf/ the merged policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from rlhf_jax import losses, plugins, stages, train
from rlhf_jax.data import synthetic, tasks
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import cli, dataset, handover, reporting, samples
from rlhf_jax.run import rewards as rw

GROUND_TRUTH = "ground-truth"


@dataclasses.dataclass(frozen=True)
class Config(
    cli.DistributedFlags,
    cli.MemoryFlags,
    cli.LoraFlags,
    dataset.DataFlags,
    reporting.ReportFlags,
    samples.SampleFlags,
):
    """PPO with a reward model or the ground-truth reward, or on --dataset with Python rewards."""

    workdir: str = "runs/ppo"
    data_dir: str = tasks.default_data_dir(__file__)  # prepared synthetic task (cached)
    init_from: str | None = (
        None  # the SFT workdir (or an HF folder of any family): policy and reference
    )
    reward: str = GROUND_TRUTH  # a reward-model workdir, or "ground-truth" (PPO-GT)
    reward_fn: tuple[str, ...] = ()  # --dataset: Python rewards, module:function or file.py:fn
    reward_weights: tuple[float, ...] = ()  # one per --reward-fn (default 1 each)
    kl_coef: float = 0.05  # initial KL coefficient beta
    target_kl: float | None = None  # adaptive KL controller target (per sequence); None: fixed
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"  # k1, k2, k3 or module:function: the per-token KL in the reward
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
    config = cli.parse_config(Config, PRESETS, argv, description=__doc__)
    start = cli.prepare_init(
        config,
        required="PPO starts from (and regularises towards) the SFT model: pass --init-from",
        task=None
        if config.dataset
        else lambda: synthetic.load_task(synthetic.prepare(config.data_dir)),
        rules={"temperature": (lambda t: t > 0, "> 0 (PPO samples)"), **cli.ON_POLICY_RULES},
    )
    learned = config.reward != GROUND_TRUTH
    functions = prompts = None
    if config.dataset:  # a researcher's prompts: Python rewards (or a reward model) on them
        functions = rw.from_flags(config, learned=learned)
    elif config.reward_fn or config.reward_weights:
        raise ConfigError("--reward-fn / --reward-weights apply to --dataset")
    if learned:
        handover.resolve_init_folder(config.reward, kind="reward", flag="--reward")
    if config.dataset:
        prompts = dataset.load(
            config, start.tokenizer, kinds=("prompt_only", "prompt_completion"),
            max_length=config.max_prompt_length + config.max_new_tokens,
            max_prompt_length=config.max_prompt_length,
        )  # fmt: skip
    if config.batch_size % config.num_minibatches:
        raise ConfigError(
            f"--batch-size {config.batch_size} is not divisible by --num-minibatches "
            f"{config.num_minibatches}"
        )
    try:
        estimator = plugins.choose(config.kl_estimator, losses.KL_ESTIMATORS, flag="--kl-estimator")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ppo = train.PPOConfig(  # checks its own ranges too
        kl_coef=config.kl_coef,
        kl_target=config.target_kl,
        kl_horizon=config.kl_horizon,
        kl_estimator=estimator,
        ppo_epochs=config.ppo_epochs,
        num_minibatches=config.num_minibatches,
        missing_eos_penalty=config.missing_eos_penalty,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        eos_id=start.tokenizer.eos_id,
        pad_id=start.tokenizer.pad_id,
    )
    callbacks = samples.callbacks_for(  # the task's held-out prompts, or the dataset's first
        config, prompts or start.task.test_prompts, start.tokenizer,
        max_prompt_length=config.max_prompt_length, max_new_tokens=config.max_new_tokens,
    )  # fmt: skip
    cli.write_run_config(config.workdir, config)  # every check passed: now the workdir

    params = start.load_params()
    schedule = stages.Schedule.from_config(config, decay=False)
    if learned:
        reward = {"reward_model": handover.load_reward_model(config.reward)}
    elif functions is not None:
        reward = rw.host_reward(functions, prompts, start.tokenizer, config.workdir)
    else:
        reward = {"host_reward": start.task.reward_fn, "reward_on": "text"}  # PPO-GT: VADER
    loader = None
    if prompts is not None:
        loader = rw.prompt_rows_loader(
            prompts, batch_size=schedule.local_batch_size,
            max_prompt_length=config.max_prompt_length, tokenizer=start.tokenizer,
            seed=config.seed,
        )  # fmt: skip
    _, rows = stages.train_ppo(
        start.model_config,
        params,
        start.task,
        workdir=config.workdir,
        mesh=start.mesh,
        schedule=schedule,
        ppo=ppo,
        value_learning_rate=config.value_learning_rate,
        max_prompt_length=config.max_prompt_length,
        seed=config.seed,
        lora=start.lora,
        quantize=config.quantize,
        base_model=start.base_model,
        prompts=loader,
        tokenizer=start.tokenizer,
        callbacks=callbacks,
        **reward,
    )
    if rows:
        last = rows[-1]
        means = "".join(f", {k} {v:.3f}" for k, v in last.items() if k.startswith("rewards/"))
        print(
            f"ppo: step {last['step']} score {last['score']:.3f} kl {last['kl_exact']:.3f}{means}"
        )
    return rows


if __name__ == "__main__":
    cli.run_cli(main)
