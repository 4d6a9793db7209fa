"""Supervised fine-tuning: the language model ("SFT" / pretrained policy) of the offline task.

    .venv/bin/python experiments/sft.py --preset tiny --workdir runs/sft_tiny   # seconds on CPU
    .venv/bin/python experiments/sft.py --workdir runs/sft                      # the default run
    .venv/bin/python experiments/sft.py --init-from PATH/gpt2 ...               # start from HF
    .venv/bin/python experiments/sft.py --init-from MODEL --dataset chats.jsonl  # your own data

Trains a decoder (GPT-2-shaped by default; `--model` takes any family's preset) on the synthetic
task's full reviews (`data/` of the repo or $RLHF_JAX_DATA, prepared on first use): every token
after the first is predicted, so the model learns the reviews' distribution and to end them with
EOS; prompts are then prefixes of them, as in the DPO paper's IMDb setup. Without --init-from the
model is `--model` (a models.PRESETS name) from random init, its vocabulary set to the task
tokenizer's.

Writes into WORKDIR: run_config.json, metrics.jsonl (step, loss, nll_token, accuracy, grad_norm,
update_norm, eval/nll_token, ...), tensorboard/, checkpoints/ (rerun the same command to resume),
and when finished hf/ (a Hugging Face folder of the family, with the tokenizer) and
model_config.json: the --init-from of reward_model.py, dpo.py and ppo.py. With --lora-rank R
(an --init-from model, usually) only LoRA adapters train on the frozen model (--quantize
int8|nf4: stored quantized, QLoRA); adapter/ holds them in PEFT's format, hf/ the merged model.

With --dataset (a .jsonl / .parquet file or tfds:NAME in TRL's formats: language modeling, `text`
or conversational `messages`, or prompt-completion) it trains on those rows instead, tokenized
with the --init-from folder's own tokenizer and chat template: the loss covers the completion
(prompt-completion), the assistant turns (--assistant-only-loss) or every token. --columns
renames columns, --truncation says how over-long rows are cut (reported); --eval-dataset gives
held-out rows. See docs/your_data.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from rlhf_jax import models, stages
from rlhf_jax.data import synthetic, tasks
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import cli, dataset, handover, reporting, samples


@dataclasses.dataclass(frozen=True)
class Config(
    cli.DistributedFlags,
    cli.MemoryFlags,
    cli.LoraFlags,
    dataset.DataFlags,
    reporting.ReportFlags,
    samples.SampleFlags,
):
    """Supervised fine-tuning on the synthetic reviews, or on --dataset."""

    workdir: str = "runs/sft"
    data_dir: str = tasks.default_data_dir(__file__)  # prepared synthetic task (cached)
    init_from: str | None = None  # HF folder (any family) or a workdir; None: random `model`
    model: str = "small"  # models.PRESETS name for a random init
    n_layers: int | None = None  # overrides the preset's depth
    steps: int = 3000
    batch_size: int = 32  # global, over all devices and hosts
    microbatches: int = 1  # gradient accumulation inside the step (divides batch_size)
    max_length: int = 64  # tokens per row (the reviews have at most ~61 with EOS)
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    log_every: int = 50
    checkpoint_every: int = 500
    eval_every: int = 500
    eval_batches: int = 4  # held-out batches of the test split per evaluation (0: none)
    eval_dataset: str | None = None  # held-out rows of --dataset's format (evaluated whole)
    assistant_only_loss: bool = False  # conversational --dataset: train on assistant turns only
    truncation: Literal["left", "right", "error"] = "right"  # an over-long row loses its end
    seed: int = 0
    mesh: str = "data=-1"  # data=D,fsdp=F,tensor=T (-1: the remaining devices)


PRESETS = {
    "default": Config(),
    "tiny": Config(
        workdir="runs/sft_tiny",
        model="tiny",
        n_layers=1,
        steps=60,
        batch_size=16,
        learning_rate=3e-3,
        warmup_steps=10,
        log_every=10,
        checkpoint_every=30,
        eval_batches=0,
    ),
}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the command line `argv`; returns the metrics rows."""
    config = cli.parse_config(Config, PRESETS, argv, description=__doc__)
    start = cli.prepare_init(
        config,
        rules={"model": (lambda m: m in models.PRESETS, "a models.PRESETS name")},
        random_init=lambda tok: handover.model_config(
            config.model, tok, **({} if config.n_layers is None else {"n_layers": config.n_layers})
        ),
        task=lambda: synthetic.load_task(synthetic.prepare(config.data_dir)),
        task_data=not config.dataset,  # a dataset is read with the model's own tokenizer
    )
    rows = eval_rows = None
    if config.dataset:  # read, checked and tokenized before anything is written
        load = dict(
            kinds=("language_modeling", "prompt_completion"),
            max_length=config.max_length,
            max_prompt_length=config.max_length - 1,
            assistant_only=config.assistant_only_loss,
        )
        rows = dataset.load(config, start.tokenizer, **load)
        if config.eval_dataset:
            eval_rows = dataset.load(
                config, start.tokenizer, flag="--eval-dataset", path=config.eval_dataset, **load
            )
    elif config.eval_dataset or config.assistant_only_loss:
        raise ConfigError(
            "--eval-dataset / --assistant-only-loss apply to --dataset (the offline task has none)"
        )
    prompt_length = config.max_length // 2  # samples: half the row for the prompt
    callbacks = samples.callbacks_for(
        config, eval_rows or rows or start.task.test_prompts, start.tokenizer,
        max_prompt_length=prompt_length, max_new_tokens=config.max_length - prompt_length,
    )  # fmt: skip
    cli.write_run_config(config.workdir, config)  # every check passed: now the workdir

    params = start.load_params()
    schedule = stages.Schedule.from_config(config)
    _, rows = stages.train_sft(
        start.task,
        start.model_config,
        params,
        workdir=config.workdir,
        mesh=start.mesh,
        schedule=schedule,
        max_length=config.max_length,
        seed=config.seed,
        eval_batches=config.eval_batches,
        lora=start.lora,
        quantize=config.quantize,
        base_model=start.base_model,
        rows=rows,
        eval_rows=eval_rows,
        tokenizer=start.tokenizer,
        callbacks=callbacks,
    )
    if rows:
        print(f"sft: step {rows[-1]['step']} loss {rows[-1]['loss']:.4f}; wrote {config.workdir}")
    return rows


if __name__ == "__main__":
    cli.run_cli(main)
