"""The SFT stage: a language model trained on the offline task's reviews (the "SFT" policy)."""

from __future__ import annotations

import os
from typing import Any

import jax

from rlhf_jax import data as rdata
from rlhf_jax import handover, models, runner, train
from rlhf_jax.stages.common import Schedule


def train_sft(
    task: Any,
    cfg: models.TransformerConfig,
    params: Any,
    *,
    workdir: str | os.PathLike,
    mesh: jax.sharding.Mesh,
    schedule: Schedule,
    max_length: int,
    seed: int = 0,
    eval_batches: int = 0,
    progress: bool = True,
) -> tuple[Any, list[dict]]:
    """Trains `params` (a `Transformer` of `cfg`) on the task's full reviews and writes
    `WORKDIR/hf/` for the next stage (`handover.save_lm`); resumes from `WORKDIR/checkpoints`.

    Every token after the first is predicted (prompt "", response = the review), so the model
    learns the reviews' distribution and to end them with EOS. With `eval_batches` > 0, held-out
    batches of the test split are evaluated every `schedule.eval_every` steps (eval/nll_token,
    eval/accuracy).

    Returns:
      (final params, metrics rows).
    """
    tok = rdata.task_tokenizer(task)
    model = models.Transformer(cfg)
    opt = schedule.optimizer()
    lengths = dict(max_length=max_length, max_prompt_length=max_length - 1)
    loader = rdata.task_loaders(
        task, "demonstration", batch_size=schedule.local_batch_size, seed=seed, **lengths
    )
    eval_fn = None
    if eval_batches:
        held_out = rdata.task_loaders(
            task,
            "demonstration",
            batch_size=schedule.local_batch_size,
            seed=0,
            split="test",
            shuffle=False,
            **lengths,
        )
        eval_set = [next(held_out) for _ in range(eval_batches)]
        sft_eval = jax.jit(train.make_sft_eval(model))

        def eval_fn(state, step):
            rows = jax.device_get([sft_eval(state.params, b) for b in eval_set])
            return {
                k: sum(float(r[k]) for r in rows) / len(rows) for k in ("nll_token", "accuracy")
            }

    state, rows = runner.fit(
        train.make_sft_step(model, opt),
        train.create_train_state(params, opt, seed),
        loader,
        workdir=workdir,
        mesh=mesh,
        eval_fn=eval_fn,
        desc="sft",
        progress=progress,
        **schedule.fit_kwargs(),
    )
    handover.save_lm(workdir, cfg, state.params, tokenizer=tok)
    return state.params, rows
