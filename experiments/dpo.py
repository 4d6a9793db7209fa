"""Direct Preference Optimization (Rafailov et al. 2023) and its family on the offline task.

    .venv/bin/python experiments/dpo.py --preset tiny --init-from runs/sft_tiny --workdir runs/dpo
    .venv/bin/python experiments/dpo.py --init-from runs/sft --beta 0.1 --loss-type sigmoid
    .venv/bin/python experiments/dpo.py --init-from runs/sft --loss-type ipo --precompute-reference
    .venv/bin/python experiments/dpo.py --init-from runs/sft --pairs my_pairs.jsonl
    .venv/bin/python experiments/dpo.py --init-from MODEL --dataset prefs.jsonl --lora-rank 16
    .venv/bin/python experiments/dpo.py --init-from runs/sft --loss my_losses:dpo_positive
    .venv/bin/python experiments/dpo.py --init-from MODEL --dataset unpaired.jsonl --loss-type kto

The policy and the frozen reference both start from --init-from (the SFT workdir or an HF folder of
any supported family). The pairs are sampled from that model and labelled by the ground truth
exactly as in reward_model.py (same seed, same pairs), or read from --pairs (a JSONL of prompt,
chosen, rejected), or --dataset (a .jsonl / .parquet file or tfds:NAME of preference rows in TRL's
formats, text or conversational, explicit or implicit prompt; tokenized with --init-from's own
tokenizer and chat template; docs/your_data.md). --loss-type is one of sigmoid (DPO), ipo,
hinge, robust, simpo, orpo, cpo (reference-free sigmoid + the chosen NLL, --cpo-alpha), kto
(unpaired: --dataset rows of prompt, completion, label, or the pairs split into a desirable and
an undesirable row; --desirable-weight, --undesirable-weight), or --loss module:function names
your own pairwise loss
`fn(pc, pr, rc, rr, *, beta)` (docs/custom_loss.md); --beta and --label-smoothing as in TRL. With
--precompute-reference the reference log-probs are computed once (`train.compute_reference_logps`)
and stored with the pairs, and training holds no reference model.

Writes into WORKDIR: run_config.json, pairs.jsonl (reused on rerun), reference_logps.npz (with
--precompute-reference), metrics.jsonl (step, loss, rewards/accuracy, rewards/margin, logps/...,
grad_norm, update_norm), tensorboard/, checkpoints/, and when finished hf/ and model_config.json.
With --lora-rank R only LoRA adapters train (rank R, scale --lora-alpha / R, on the projections
--lora-targets selects); the SFT model is their frozen base and, adapters off, the reference (one
copy); --quantize int8|nf4 stores that base quantized (QLoRA); checkpoints hold the adapters,
adapter/ has them in PEFT's format and hf/ the merged model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Literal

from rlhf_jax import losses, models, pairs, plugins, stages
from rlhf_jax.data import synthetic, tasks
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import checks, cli, dataset, reporting, samples
from rlhf_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Config(
    cli.DistributedFlags,
    cli.MemoryFlags,
    cli.LoraFlags,
    dataset.DataFlags,
    reporting.ReportFlags,
    samples.SampleFlags,
):
    """DPO-family training on ground-truth-labelled pairs of SFT samples."""

    workdir: str = "runs/dpo"
    data_dir: str = tasks.default_data_dir(__file__)  # prepared synthetic task (cached)
    init_from: str | None = (
        None  # the SFT workdir (or an HF folder of any family): policy and reference
    )
    pairs: str | None = None  # a preference JSONL to train on instead of sampling pairs
    on_bad_record: Literal["error", "skip"] = "error"  # a bad --pairs line: stop, or skip it
    num_prompts: int = 2000  # training prefixes; pairs = num_prompts * k(k-1)/2 minus ties
    completions_per_prompt: int = 4  # k
    max_new_tokens: int = 48
    temperature: float = 1.0
    max_prompt_length: int = 8
    max_length: int = 64  # tokens per prompt + completion row
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "cpo", "kto"] = (
        "sigmoid"
    )
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative / robust DPO label-noise epsilon
    cpo_alpha: float = 1.0  # --loss-type cpo: the weight of the chosen completions' NLL
    desirable_weight: float = 1.0  # --loss-type kto: w_d of desirable rows
    undesirable_weight: float = 1.0  # --loss-type kto: w_u of undesirable rows
    loss: str | None = None  # module:function (or file.py:function): a pairwise loss instead
    custom_loss: str | None = None  # set by main(loss_fn=...): the function trained instead
    precompute_reference: bool = False  # reference log-probs once, no reference model in training
    steps: int = 1000
    batch_size: int = 32  # global, over all devices and hosts
    microbatches: int = 1  # gradient accumulation inside the step (divides batch_size)
    learning_rate: float = 1e-5
    warmup_steps: int = 50
    log_every: int = 20
    checkpoint_every: int = 250
    seed: int = 0
    mesh: str = "data=-1"  # data=D,fsdp=F,tensor=T (-1: the remaining devices)


PRESETS = {
    "default": Config(),
    "tiny": Config(
        workdir="runs/dpo_tiny",
        num_prompts=48,
        max_new_tokens=24,
        max_length=40,
        steps=30,
        batch_size=16,
        learning_rate=1e-4,
        warmup_steps=5,
        log_every=10,
        checkpoint_every=30,
    ),
}


def main(
    argv: Sequence[str] | None = None, *, loss_fn: losses.PairwiseLoss | None = None
) -> list[dict]:
    """Runs the command line `argv`; returns the metrics rows.

    `loss_fn` (library use, e.g. experiments/custom_loss.py): a pairwise loss function
    `fn(pc, pr, rc, rr, *, beta)` trained instead of --loss-type; its name is stored in the run
    config (`custom_loss`), so a rerun with another function is refused like any other change.
    """
    config = cli.parse_config(Config, PRESETS, argv, description=__doc__)
    if loss_fn is not None and config.loss:
        raise ConfigError("--loss given with main(loss_fn=...): pass one of them")
    if config.loss:  # imported at the door: a bad name is one line, before anything is written
        try:
            loss_fn = plugins.load_callable(config.loss, flag="--loss")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif loss_fn is not None:
        config = dataclasses.replace(config, custom_loss=_describe(loss_fn))
    start = cli.prepare_init(
        config,
        required="DPO starts from (and regularises towards) the SFT model: pass --init-from",
        task=lambda: synthetic.load_task(synthetic.prepare(config.data_dir)),
        files=("pairs",),
        task_data=not (config.pairs or config.dataset),  # read with the model's own tokenizer
    )
    records = None
    kto = config.loss_type == "kto"
    if kto and config.precompute_reference:
        raise ConfigError(
            "--precompute-reference applies to the pairwise losses; --loss-type kto runs the "
            "reference on each batch's rows and mismatched pairs"
        )
    if kto and (config.loss or loss_fn is not None):
        raise ConfigError("--loss (a pairwise loss) and --loss-type kto: pass one of them")
    if config.pairs and config.dataset:
        raise ConfigError("--pairs and --dataset both given: pass one (--dataset reads any format)")
    if config.pairs:  # read (and checked) before anything is written
        records = checks.read_pairs(config.pairs, config.on_bad_record, at_least=config.batch_size)
    if config.dataset:  # read, checked and tokenized with the model's tokenizer, before writing
        kinds = ("preference", "unpaired_preference") if kto else ("preference",)
        records = dataset.load(
            config, start.tokenizer, kinds=kinds, max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
        )  # fmt: skip
        if len(records) < config.batch_size:
            raise ConfigError(
                f"--dataset {config.dataset}: {len(records)} pairs, fewer than one batch of "
                f"--batch-size {config.batch_size}"
            )
    callbacks = samples.callbacks_for(  # the task's held-out prompts, or the dataset's first
        config, start.task.test_prompts if start.task and not records else records,
        start.tokenizer, max_prompt_length=config.max_prompt_length,
        max_new_tokens=config.max_length - config.max_prompt_length,
    )  # fmt: skip
    cli.write_run_config(config.workdir, config)  # every check passed: now the workdir

    params = start.load_params()
    if records is None:
        records = pairs.task_preference_pairs(
            start.task,
            models.Transformer(start.model_config),
            params,
            num_prompts=config.num_prompts,
            seed=config.seed,
            sampling=SamplingConfig(config.max_new_tokens, config.temperature),
            completions_per_prompt=config.completions_per_prompt,
            max_prompt_length=config.max_prompt_length,
            cache_path=os.path.join(config.workdir, "pairs.jsonl"),
        )
        if len(records) < config.batch_size:
            raise ConfigError(
                f"{len(records)} sampled pairs, fewer than one batch of --batch-size "
                f"{config.batch_size}; raise --num-prompts"
            )
    name = config.loss or config.custom_loss or config.loss_type
    print(f"dpo ({name}, beta {config.beta}): {len(records)} training pairs")
    schedule = stages.Schedule.from_config(config)
    _, rows, _ = stages.train_dpo(
        start.model_config,
        params,
        records,
        start.tokenizer,
        workdir=config.workdir,
        mesh=start.mesh,
        schedule=schedule,
        betas=config.beta,
        loss_type=config.loss_type if loss_fn is None else loss_fn,
        label_smoothing=config.label_smoothing,
        cpo_alpha=config.cpo_alpha,
        desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight,
        precompute_reference=config.precompute_reference,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        seed=config.seed,
        lora=start.lora,
        quantize=config.quantize,
        base_model=start.base_model,
        callbacks=callbacks,
    )
    if rows:
        last = rows[-1]
        print(f"dpo: step {last['step']} loss {last['loss']:.4f}; wrote {config.workdir}")
    return rows


def _describe(fn: losses.PairwiseLoss) -> str:
    """`module.name(keyword=value, ...)` of a function or a functools.partial of one."""
    args = ""
    if isinstance(fn, functools.partial):
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(fn.keywords.items()))
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}({args})"


if __name__ == "__main__":
    cli.run_cli(main)
