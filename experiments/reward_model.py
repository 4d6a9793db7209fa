"""Bradley-Terry reward model (seed eq. 2) on pairs sampled from the SFT model.

    .venv/bin/python experiments/reward_model.py --preset tiny --init-from runs/sft_tiny \\
        --workdir runs/rm_tiny
    .venv/bin/python experiments/reward_model.py --init-from runs/sft --workdir runs/rm
    .venv/bin/python experiments/reward_model.py --init-from runs/sft --pairs my_pairs.jsonl
    .venv/bin/python experiments/reward_model.py --init-from MODEL --dataset prefs.parquet

As in the DPO paper's IMDb setup: `completions_per_prompt` completions are sampled from the SFT
model (--init-from, an SFT workdir or an HF folder of any family) for each of the first
`num_prompts` training prefixes, all pairs of a prompt are labelled by the ground-truth reward
(VADER), and the reward model (the SFT trunk plus a linear head on the last token) is trained on
them. Held-out pairs come from test prefixes the same way. With --pairs the pairs are read from a
JSONL file (prompt, chosen, rejected) and its last tenth is held out; --dataset reads preference
rows in any of TRL's formats (a .jsonl / .parquet file or tfds:NAME, text or conversational),
tokenized with --init-from's own tokenizer and chat template, its last tenth held out likewise.

Writes into WORKDIR: run_config.json, pairs.jsonl and pairs_test.jsonl (reused on rerun),
metrics.jsonl (step, loss, accuracy, margin, ..., eval/accuracy = held-out pair accuracy),
tensorboard/, checkpoints/, and when finished reward_model/ (the trunk as an HF folder plus
head.safetensors) and model_config.json: the --reward of ppo.py. With --lora-rank R only LoRA
adapters on the trunk train, with the head beside them; --quantize int8|nf4 stores the frozen
trunk quantized (QLoRA); adapter/ holds the adapters in PEFT's format plus head.safetensors, and
reward_model/ the merged reward model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Literal

from rlhf_jax import models, pairs, stages
from rlhf_jax.data import synthetic, tasks
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import checks, cli, dataset, reporting
from rlhf_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Config(
    cli.DistributedFlags,
    cli.MemoryFlags,
    cli.LoraFlags,
    dataset.DataFlags,
    reporting.ReportFlags,
):
    """Bradley-Terry reward model on ground-truth-labelled pairs of SFT samples."""

    workdir: str = "runs/reward_model"
    data_dir: str = tasks.default_data_dir(__file__)  # prepared synthetic task (cached)
    init_from: str | None = (
        None  # the SFT workdir (or an HF folder of any family): sampler and trunk
    )
    pairs: str | None = None  # a preference JSONL to train on instead of sampling pairs
    on_bad_record: Literal["error", "skip"] = "error"  # a bad --pairs line: stop, or skip it
    num_prompts: int = 2000  # training prefixes; pairs = num_prompts * k(k-1)/2 minus ties
    num_test_prompts: int = 200  # held-out prefixes
    completions_per_prompt: int = 4  # k
    max_new_tokens: int = 48
    temperature: float = 1.0
    max_prompt_length: int = 8
    max_length: int = 64  # tokens per prompt + completion row
    steps: int = 1000
    batch_size: int = 32  # global, over all devices and hosts
    microbatches: int = 1  # gradient accumulation inside the step (divides batch_size)
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    log_every: int = 20
    checkpoint_every: int = 250
    eval_every: int = 250
    seed: int = 0
    mesh: str = "data=-1"  # data=D,fsdp=F,tensor=T (-1: the remaining devices)


PRESETS = {
    "default": Config(),
    "tiny": Config(
        workdir="runs/rm_tiny",
        num_prompts=48,
        num_test_prompts=16,
        max_new_tokens=24,
        max_length=40,
        steps=30,
        batch_size=16,
        learning_rate=1e-3,
        warmup_steps=5,
        log_every=10,
        checkpoint_every=30,
        eval_every=30,
    ),
}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the command line `argv`; returns the metrics rows."""
    config = cli.parse_config(Config, PRESETS, argv, description=__doc__)
    start = cli.prepare_init(
        config,
        required="the reward model starts from the SFT model: pass --init-from",
        task=lambda: synthetic.load_task(synthetic.prepare(config.data_dir)),
        files=("pairs",),
        task_data=not (config.pairs or config.dataset),  # read with the model's own tokenizer
    )
    records = test_records = None
    if config.pairs and config.dataset:
        raise ConfigError("--pairs and --dataset both given: pass one (--dataset reads any format)")
    if config.pairs or config.dataset:  # read before anything is written; the last tenth held out
        if config.dataset:  # tokenized with the model's own tokenizer
            records = dataset.load(
                config, start.tokenizer, kinds=("preference",), max_length=config.max_length,
                max_prompt_length=config.max_prompt_length,
            )  # fmt: skip
        else:
            records = checks.read_pairs(
                config.pairs, config.on_bad_record, at_least=config.batch_size + 1
            )
        n_test = max(1, len(records) // 10)
        if len(records) - n_test < config.batch_size:
            raise ConfigError(
                f"{'--pairs' if config.pairs else '--dataset'} {config.pairs or config.dataset}: "
                f"{len(records)} valid pairs leave "
                f"{len(records) - n_test} for training after {n_test} held out, fewer than one "
                f"batch of --batch-size {config.batch_size}"
            )
        records, test_records = records[:-n_test], records[-n_test:]
    cli.write_run_config(config.workdir, config)  # every check passed: now the workdir

    lm_params = start.load_params()
    if records is None:
        sample = dict(
            seed=config.seed,
            sampling=SamplingConfig(config.max_new_tokens, config.temperature),
            completions_per_prompt=config.completions_per_prompt,
            max_prompt_length=config.max_prompt_length,
        )
        policy = models.Transformer(start.model_config)
        records = pairs.task_preference_pairs(
            start.task,
            policy,
            lm_params,
            num_prompts=config.num_prompts,
            cache_path=os.path.join(config.workdir, "pairs.jsonl"),
            **sample,
        )
        test_records = pairs.task_preference_pairs(
            start.task,
            policy,
            lm_params,
            split="test",
            num_prompts=config.num_test_prompts,
            cache_path=os.path.join(config.workdir, "pairs_test.jsonl"),
            **sample,
        )
        if len(records) < config.batch_size:
            raise ConfigError(
                f"{len(records)} sampled pairs, fewer than one batch of --batch-size "
                f"{config.batch_size}; raise --num-prompts"
            )
    print(f"reward model: {len(records)} training pairs, {len(test_records)} held-out pairs")
    schedule = stages.Schedule.from_config(config)
    _, rows, info = stages.train_reward_model(
        start.model_config,
        lm_params,
        records,
        test_records,
        start.tokenizer,
        workdir=config.workdir,
        mesh=start.mesh,
        schedule=schedule,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        seed=config.seed,
        lora=start.lora,
        quantize=config.quantize,
        base_model=start.base_model,
    )
    if "heldout_accuracy" in info:
        print(f"reward model: held-out pair accuracy {info['heldout_accuracy']:.3f}")
    return rows


if __name__ == "__main__":
    cli.run_cli(main)
