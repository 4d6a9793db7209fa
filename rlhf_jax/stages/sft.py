"""The SFT stage: a language model trained on the offline task's reviews (the "SFT" policy), or on
a researcher's encoded dataset (`data.encode_dataset` rows)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax

from rlhf_jax import data as rdata
from rlhf_jax import lora as lora_lib
from rlhf_jax import models, train
from rlhf_jax.run import handover, runner
from rlhf_jax.stages.common import Schedule, check_vocab, save_adapted


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
    lora: Any = None,
    quantize: str = "none",
    base_model: str | None = None,
    rows: Sequence[Any] | None = None,
    eval_rows: Sequence[Any] | None = None,
    tokenizer: Any = None,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, list[dict]]:
    """Trains `params` (a `Transformer` of `cfg`) on the task's full reviews and writes
    `WORKDIR/hf/` for the next stage (`handover.save_lm`); resumes from `WORKDIR/checkpoints`.

    Every token after the first is predicted (prompt "", response = the review), so the model
    learns the reviews' distribution and to end them with EOS. With `eval_batches` > 0, held-out
    batches of the test split are evaluated every `schedule.eval_every` steps (eval/nll_token,
    eval/accuracy).

    With `lora` (a `lora.LoraConfig`) only adapters train on the frozen `params` (quantized with
    `quantize` "int8" / "nf4": QLoRA); the run writes them in PEFT's format (`WORKDIR/adapter/`)
    and the merged model as `WORKDIR/hf/`.

    Args:
      base_model: a LoRA run's starting HF folder, named as the base in the PEFT adapter's
        adapter_config.json (`base_model_name_or_path`).
      rows, eval_rows, tokenizer: a researcher's data instead of the task (`task` may be None):
        the token rows of `data.encode_dataset` (tokens, loss_mask) to train on and, when given,
        to evaluate on every `schedule.eval_every` steps; `tokenizer` is written with the model.
      callbacks: `runner.fit` hooks (`run.callbacks`; e.g. `run.samples.CompletionSamples`),
        which see the policy through `Event.policy()`.

    Returns:
      (final params (merged under `lora`), metrics rows).
    """
    tok = tokenizer or rdata.task_tokenizer(task)
    check_vocab(cfg, tok, name="tokenizer" if tokenizer is not None else "the task's tokenizer")
    model = models.Transformer(cfg)
    opt = schedule.optimizer()
    if lora is None:
        step = train.make_sft_step(model, opt, microbatches=schedule.microbatches)
        state0 = train.create_train_state(params, opt, seed)

        def policy_of(state):
            return state.params
    else:
        adapters, base = lora_lib.prepare(params, lora, jax.random.PRNGKey(seed), quantize=quantize)
        model = lora_lib.LoraTransformer(cfg, lora)
        loss = lora_lib.lora_loss(train.make_sft_loss(model))
        step = train.make_step(loss, opt, microbatches=schedule.microbatches)
        state0 = train.create_train_state(adapters, opt, seed, frozen={"base": base})

        def policy_of(state):
            return {"base": state.frozen["base"], "lora": state.params}

    lengths = dict(max_length=max_length, max_prompt_length=max_length - 1, tokenizer=tok)
    batch = dict(batch_size=schedule.local_batch_size, **lengths)
    loader = rdata.task_loaders(task, "demonstration", seed=seed, records=rows, **batch)
    eval_fn = None
    if rows is not None:
        eval_batches = max(1, len(eval_rows) // schedule.local_batch_size) if eval_rows else 0
    if eval_batches:
        held_out = rdata.task_loaders(
            task, "demonstration", seed=0, split="test", shuffle=False, records=eval_rows, **batch
        )
        eval_set = [next(held_out) for _ in range(eval_batches)]
        sft_eval = jax.jit(train.make_sft_eval(model))

        def eval_fn(state, step):
            rows = jax.device_get([sft_eval(policy_of(state), b) for b in eval_set])
            return {
                k: sum(float(r[k]) for r in rows) / len(rows) for k in ("nll_token", "accuracy")
            }

    state, rows = runner.fit(
        step,
        state0,
        loader,
        workdir=workdir,
        mesh=mesh,
        eval_fn=eval_fn,
        callbacks=callbacks,
        policy=lambda state: (model, policy_of(state)),
        desc="sft" if lora is None else "sft (lora)",
        progress=progress,
        **schedule.fit_kwargs(),
    )
    if lora is not None:
        return save_adapted(
            workdir, cfg, state.frozen["base"], state.params, lora, tok, base_model
        ), rows
    handover.save_lm(workdir, cfg, state.params, tokenizer=tok)
    return state.params, rows
