"""Direct Preference Optimization (Rafailov et al. 2023) and its family on the offline task.

    .venv/bin/python experiments/dpo.py --preset tiny --init-from runs/sft_tiny --workdir runs/dpo
    .venv/bin/python experiments/dpo.py --init-from runs/sft --beta 0.1 --loss-type sigmoid
    .venv/bin/python experiments/dpo.py --init-from runs/sft --loss-type ipo --precompute-reference
    .venv/bin/python experiments/dpo.py --init-from runs/sft --pairs my_pairs.jsonl

The policy and the frozen reference both start from --init-from (the SFT workdir or an HF GPT-2
folder). The pairs are sampled from that model and labelled by the ground truth exactly as in
reward_model.py (same seed, same pairs), or read from --pairs (a JSONL of prompt, chosen,
rejected). --loss-type is one of sigmoid (DPO), ipo, hinge, robust, simpo, orpo; --beta and
--label-smoothing as in TRL. With --precompute-reference the reference log-probs are computed once
(`train.compute_reference_logps`) and stored with the pairs, and training holds no reference model.

Writes into WORKDIR: run_config.json, pairs.jsonl (reused on rerun), reference_logps.npz (with
--precompute-reference), metrics.jsonl (step, loss, rewards/accuracy, rewards/margin, logps/...,
grad_norm, update_norm), tensorboard/, checkpoints/, and when finished hf/ and model_config.json.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

from rlhf_jax import data, models, pairs, runner, sharding, train
from rlhf_jax.data import synthetic
from rlhf_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Config:
    """DPO-family training on ground-truth-labelled pairs of SFT samples."""

    workdir: str = "runs/dpo"
    data_dir: str = runner.default_data_dir(__file__)  # prepared synthetic task (cached)
    init_from: str | None = None  # the SFT workdir (or HF GPT-2 folder): policy and reference
    pairs: str | None = None  # a preference JSONL to train on instead of sampling pairs
    num_prompts: int = 2000  # training prefixes; pairs = num_prompts * k(k-1)/2 minus ties
    completions_per_prompt: int = 4  # k
    max_new_tokens: int = 48
    temperature: float = 1.0
    max_prompt_length: int = 8
    max_length: int = 64  # tokens per prompt + completion row
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo | orpo
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative / robust DPO label-noise epsilon
    precompute_reference: bool = False  # reference log-probs once, no reference model in training
    steps: int = 1000
    batch_size: int = 32  # global, over all devices and hosts
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


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the command line `argv`; returns the metrics rows."""
    config = runner.parse_config(Config, PRESETS, argv, description=__doc__)
    sharding.init_distributed()
    mesh = runner.resolve_mesh(config.mesh)
    local_batch = runner.check_batch(config.batch_size, mesh)
    if config.loss_type not in train.LOSS_TYPES:
        raise runner.ConfigError(f"--loss-type must be one of {', '.join(train.LOSS_TYPES)}")
    if not config.init_from:
        raise runner.ConfigError(
            "DPO starts from (and regularises towards) the SFT model: pass --init-from"
        )
    runner.write_run_config(config.workdir, config)
    task = synthetic.load_task(synthetic.prepare(config.data_dir))
    tok = runner.task_tokenizer(task)
    cfg, params = runner.load_init_params(config.init_from)
    runner.check_model(
        cfg,
        tok,
        max_length=max(config.max_length, config.max_prompt_length + config.max_new_tokens),
    )
    model = models.Transformer(cfg)

    if config.pairs:
        records = data.read_preference_jsonl(config.pairs)
    else:
        records = pairs.task_preference_pairs(
            task,
            models.Transformer(cfg),
            params,
            num_prompts=config.num_prompts,
            seed=config.seed,
            sampling=SamplingConfig(config.max_new_tokens, config.temperature),
            completions_per_prompt=config.completions_per_prompt,
            max_prompt_length=config.max_prompt_length,
            cache_path=os.path.join(config.workdir, "pairs.jsonl"),
        )
    lengths = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length)
    needs_reference = config.loss_type not in ("simpo", "orpo")
    frozen = params if needs_reference else None
    if needs_reference and config.precompute_reference:
        cache = os.path.join(config.workdir, "reference_logps.npz")
        collate = functools.partial(
            data.collate_preferences, tokenizer=tok, buckets=None, **lengths
        )
        records = train.attach_reference(
            model,
            params,
            [data.record_to_dict(r) for r in records],
            collate,
            cache_path=cache,
            is_primary=sharding.is_primary(),
        )
        frozen = None  # the batches carry the reference log-probs
    print(f"dpo ({config.loss_type}, beta {config.beta}): {len(records)} training pairs")

    opt = train.make_optimizer(
        config.learning_rate, warmup_steps=config.warmup_steps, total_steps=config.steps
    )
    state = train.create_train_state(
        params, opt, config.seed, frozen=frozen, hparams={"beta": config.beta}
    )
    loader = runner.task_loaders(
        task, "preference", records=records, batch_size=local_batch, seed=config.seed, **lengths
    )
    step = train.make_dpo_step(
        model, opt, loss_type=config.loss_type, label_smoothing=config.label_smoothing
    )
    state, rows = runner.fit(
        step,
        state,
        loader,
        workdir=config.workdir,
        steps=config.steps,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        mesh=mesh,
        desc=f"dpo ({config.loss_type})",
    )
    runner.save_lm(config.workdir, cfg, state.params, tokenizer=tok)
    if rows:
        last = rows[-1]
        print(f"dpo: step {last['step']} loss {last['loss']:.4f}; wrote {config.workdir}")
    return rows


if __name__ == "__main__":
    runner.run_cli(main)
