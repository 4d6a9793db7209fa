"""The DPO stage: the DPO family on preference pairs from the SFT model, one beta or a beta sweep
as one vmapped program."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

from rlhf_jax import data as rdata
from rlhf_jax import distributed, losses, models, paths, sweeps, train
from rlhf_jax import lora as lora_lib
from rlhf_jax import sharding as sh
from rlhf_jax.run import handover, runner
from rlhf_jax.stages.common import Schedule, check_vocab, preference_loader, save_adapted

REFERENCE_CACHE = "reference_logps.npz"
TIMING_FILE = "timing.json"


def train_dpo(
    cfg: models.TransformerConfig,
    params: Any,
    records: Sequence[Any],
    tokenizer: rdata.Tokenizer,
    *,
    workdir: str | os.PathLike,
    mesh: jax.sharding.Mesh,
    schedule: Schedule,
    betas: float | Sequence[float],
    loss_type: str | losses.PairwiseLoss = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    average_log_prob: bool = False,
    precompute_reference: bool = False,
    max_length: int,
    max_prompt_length: int,
    seed: int = 0,
    eval_fn: Callable[[Any, int], dict] | None = None,
    time_sweep_steps: int = 0,
    progress: bool = True,
    lora: Any = None,
    quantize: str = "none",
    base_model: str | None = None,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, list[dict], dict[str, Any]]:
    """Trains the policy from `params` (also the reference) with `train.make_dpo_step`.

    One beta trains one policy and writes `WORKDIR/hf/` (`handover.save_lm`); several betas
    train them all as one `jit(vmap(step))` (`sweeps.sweep_step`; metrics "loss/i", ...), and,
    with `time_sweep_steps` > 0, time that program against the same runs one by one
    (`WORKDIR/timing.json`). With `precompute_reference` the reference log-probs are computed
    once (`train.attach_reference`, cached in `WORKDIR/reference_logps.npz`) and training holds
    no reference model. `loss_type` is a name or a pairwise loss function
    (`losses.pairwise_loss`); "simpo" / "orpo" / "cpo" need no reference (`cpo_alpha` weighs
    CPO's NLL term). "kto" trains `train.make_kto_step` on unpaired rows: `records` of an
    unpaired dataset (prompt, completion, label), or preference records split in two
    (`data.unpair_preferences`), with `desirable_weight` / `undesirable_weight`.

    With `lora` (a `lora.LoraConfig`) only adapters train: the state's params are the adapters,
    `frozen = {"base": params}` is the one copy of the base, which is also the reference (the
    base with the adapters off; `rlhf_jax.lora`), and checkpoints hold the adapters and their
    optimizer state. `quantize` ("int8", "nf4") stores that base quantized (QLoRA). A single run
    also writes the adapters in PEFT's format (`WORKDIR/adapter/`); `WORKDIR/hf/` holds the
    merged model.

    Args:
      eval_fn: `(state, step) -> dict` for `runner.fit` (a sweep state for several betas).
      base_model: a LoRA run's starting HF folder, named as the base in the PEFT adapter's
        adapter_config.json (`base_model_name_or_path`).
      callbacks: `runner.fit` hooks (`run.callbacks`; e.g. `run.samples.CompletionSamples`),
        which see the policy through `Event.policy()`.

    Returns:
      (final params (stacked over betas for a sweep; merged with the adapters under `lora`),
      metrics rows, info: pairs, timing).
    """
    check_vocab(cfg, tokenizer)
    sweep = not isinstance(betas, int | float)
    beta_list = [float(b) for b in betas] if sweep else [float(betas)]
    model = models.Transformer(cfg)
    workdir = paths.as_path(workdir)  # local or cloud (gs://)
    lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    needs_reference = callable(loss_type) or loss_type not in train.dpo.REFERENCE_FREE
    frozen = params if needs_reference else None
    kto = loss_type == "kto"
    if kto:
        if precompute_reference:
            raise ValueError("precompute_reference applies to the pairwise losses, not to kto")
        records = rdata.as_unpaired(records)
    if needs_reference and precompute_reference:
        collate = functools.partial(
            rdata.collate_preferences, tokenizer=tokenizer, buckets=None, **lengths
        )
        if distributed.is_primary():
            workdir.mkdir(parents=True, exist_ok=True)
        records = train.attach_reference(
            model,
            params,
            [r if isinstance(r, dict) else rdata.record_to_dict(r) for r in records],
            collate,
            average_log_prob=average_log_prob,
            cache_path=workdir / REFERENCE_CACHE,
            is_primary=distributed.is_primary(),
        )
        frozen = None  # the batches carry the reference log-probs
    opt = schedule.optimizer()
    dpo_kwargs = dict(
        loss_type=loss_type, label_smoothing=label_smoothing, average_log_prob=average_log_prob,
        cpo_alpha=cpo_alpha,
    )  # fmt: skip
    weights = dict(desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)

    def make_loss(net: Any) -> Any:
        return (
            train.make_kto_loss(net, **weights) if kto else train.make_dpo_loss(net, **dpo_kwargs)
        )

    if lora is None:
        step = train.make_step(make_loss(model), opt, microbatches=schedule.microbatches)
        trained, frozen_state = params, frozen
    else:  # adapters train; the base is frozen and (unless precomputed) the reference
        loss = make_loss(lora_lib.LoraTransformer(cfg, lora))
        step = train.make_step(lora_lib.lora_loss(loss), opt, microbatches=schedule.microbatches)
        trained, base = lora_lib.prepare(params, lora, jax.random.PRNGKey(seed), quantize=quantize)
        frozen_state = {"base": base} if frozen is not None else {"base": base, "ref": None}
    states = [
        train.create_train_state(trained, opt, seed, frozen=frozen_state, hparams={"beta": b})
        for b in beta_list
    ]

    def loader_of(rows: Sequence[Any], seed: int) -> Any:
        if not kto:
            return preference_loader(
                rows, tokenizer, batch_size=schedule.local_batch_size, seed=seed, **lengths
            )
        return rdata.task_loaders(
            None, "unpaired", records=rows, tokenizer=tokenizer,
            batch_size=schedule.local_batch_size, seed=seed, **lengths,
        )  # fmt: skip

    loader = loader_of(records, seed)
    info: dict[str, Any] = {"pairs": len(records)}

    def policy(state: Any) -> tuple[Any, Any]:
        if lora is None:
            return model, state.params
        return lora_lib.LoraTransformer(cfg, lora), lora_lib.view(
            state.params, state.frozen["base"]
        )

    if not sweep:
        state, rows = runner.fit(
            step,
            states[0],
            loader,
            workdir=workdir,
            mesh=mesh,
            eval_fn=eval_fn,
            callbacks=callbacks,
            policy=policy,
            desc="dpo" if lora is None else "dpo (lora)",
            progress=progress,
            **schedule.fit_kwargs(),
        )
        if lora is not None:
            base = state.frozen["base"]
            return (
                save_adapted(workdir, cfg, base, state.params, lora, tokenizer, base_model),
                rows,
                info,
            )
        handover.save_lm(workdir, cfg, state.params, tokenizer=tokenizer)
        return state.params, rows, info

    stacked = sweeps.stack_sweep(states)
    first = records[: schedule.local_batch_size]  # a batch of the training shapes
    example = next(loader_of(first, seed))
    compiled = sh.compile_step(sweeps.sweep_step(step), mesh, stacked, example)
    timing_path = workdir / TIMING_FILE
    if time_sweep_steps and not timing_path.is_file():
        timing_loader = loader_of(records, seed + 100)
        batches = [sh.shard_batch(next(timing_loader), mesh) for _ in range(time_sweep_steps + 1)]
        one = sh.compile_step(step, mesh, sweeps.sweep_member(stacked, 0), example)
        timing = sweeps.time_sweep(
            compiled, one, stacked, batches, place=lambda s: sh.shard_state(s, mesh)
        )
        if distributed.is_primary():
            workdir.mkdir(parents=True, exist_ok=True)
            paths.write_text_atomic(timing_path, json.dumps(timing, indent=2) + "\n")
    if timing_path.is_file():
        info["timing"] = json.loads(timing_path.read_text())
    state, rows = runner.fit(
        compiled,
        stacked,
        loader,
        workdir=workdir,
        mesh=mesh,
        eval_fn=eval_fn,
        callbacks=callbacks,
        desc="dpo sweep",
        progress=progress,
        jit=False,  # compiled above
        **schedule.fit_kwargs(),
    )
    policy = state["members"].params
    if lora is not None:
        base = state["shared"]["frozen"]["base"]
        policy = jax.vmap(lambda a: lora_lib.merge(base, a, lora))(policy)
    return policy, rows, info
