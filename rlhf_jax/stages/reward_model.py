"""The reward-model stage: a Bradley-Terry reward model (seed Eq. 2) initialised from the SFT
model, with its held-out pair accuracy (`eval.preference_accuracy`, the one accuracy function)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import data as rdata
from rlhf_jax import distributed, models, paths, train
from rlhf_jax import eval as ev
from rlhf_jax import lora as lora_lib
from rlhf_jax.lora import peft as peft_io
from rlhf_jax.run import handover, runner
from rlhf_jax.stages.common import ADAPTER_DIR, Schedule, check_vocab, preference_loader

INFO_FILE = "reward_model_eval.json"


def train_reward_model(
    cfg: models.TransformerConfig,
    lm_params: Any,
    train_pairs: Sequence[Any],
    test_pairs: Sequence[Any],
    tokenizer: rdata.Tokenizer,
    *,
    workdir: str | os.PathLike,
    mesh: jax.sharding.Mesh,
    schedule: Schedule,
    max_length: int,
    max_prompt_length: int,
    seed: int = 0,
    normalize: bool = False,
    progress: bool = True,
    lora: Any = None,
    quantize: str = "none",
    base_model: str | None = None,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, list[dict], dict[str, Any]]:
    """Trains a `RewardModel` (trunk = `lm_params`, head ~ N(0, 1/sqrt(D+1)) from PRNGKey(seed))
    on `train_pairs`; evaluates the held-out accuracy on `test_pairs` every
    `schedule.eval_every` steps and at the end (eval/accuracy, eval/margin); writes
    `WORKDIR/reward_model/` (`handover.save_reward_model`) and `WORKDIR/reward_model_eval.json`.

    With `lora` (a `lora.LoraConfig`) adapters train on the frozen trunk (quantized with
    `quantize` "int8" / "nf4": QLoRA) and the head trains in full beside them (PEFT's
    modules_to_save); the run writes the trunk's adapters in PEFT's format plus the head
    (`WORKDIR/adapter/`, `head.safetensors`) and the merged reward model as usual.

    With `normalize`, the head is rescaled so that the scores of the held-out pairs have mean 0
    and standard deviation 1 (a fixed reward scale for PPO).

    Args:
      base_model: a LoRA run's starting HF folder, named as the base in the PEFT adapter's
        adapter_config.json (`base_model_name_or_path`).
      callbacks: `runner.fit` hooks (`run.callbacks`; `Event.policy()` is None: no policy).

    Returns:
      (params, metrics rows, info: heldout_accuracy, heldout_margin, heldout_pairs, train_pairs,
      train_accuracy_last_log, and with `normalize` the mean/std removed).
    """
    check_vocab(cfg, tokenizer)
    rm = models.RewardModel(cfg)
    params = models.init_reward_params(cfg, jax.random.PRNGKey(seed), lm_params)
    opt = schedule.optimizer()
    if lora is None:
        step = train.make_reward_step(rm, opt, microbatches=schedule.microbatches)
        state0 = train.create_train_state(params, opt, seed)

        def scored(state):
            return state.params
    else:  # adapters on the trunk, the head beside them; the trunk frozen
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
        adapters, base = lora_lib.prepare(params, lora, rng, quantize=quantize)
        trunk = {"transformer": base["transformer"]}
        rm = lora_lib.LoraRewardModel(cfg, lora)
        loss = lora_lib.lora_loss(train.make_reward_loss(rm))
        step = train.make_step(loss, opt, microbatches=schedule.microbatches)
        trained = lora_lib.trained(adapters, {"head": params["head"]})
        state0 = train.create_train_state(trained, opt, seed, frozen={"base": trunk})

        def scored(state):
            return lora_lib.view(state.params, state.frozen["base"])

    lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    loader = preference_loader(
        train_pairs, tokenizer, batch_size=schedule.local_batch_size, seed=seed, **lengths
    )

    def eval_fn(state, step):
        return ev.preference_accuracy(rm, scored(state), test_pairs, tokenizer, **lengths)

    state, rows = runner.fit(
        step,
        state0,
        loader,
        workdir=workdir,
        mesh=mesh,
        eval_fn=eval_fn if test_pairs else None,
        callbacks=callbacks,
        desc="reward model" if lora is None else "reward model (lora)",
        progress=progress,
        **schedule.fit_kwargs(),
    )
    if lora is None:
        params = distributed.to_host(state.params)
    else:  # the merged reward model from here on (scores, normalisation, hand-over)
        adapters, modules = distributed.to_host(lora_lib.split_trained(state.params))
        params = distributed.to_host(
            lora_lib.merge({**state.frozen["base"], **modules}, adapters, lora)
        )
        rm = models.RewardModel(cfg)
        if distributed.is_primary():
            _save_adapter(
                paths.as_path(workdir) / ADAPTER_DIR, cfg, adapters, modules["head"], lora,
                base_model,
            )  # fmt: skip
    info: dict[str, Any] = {
        "train_pairs": len(train_pairs),
        "train_accuracy_last_log": float(rows[-1]["accuracy"]) if rows else float("nan"),
    }
    if test_pairs:
        chosen, rejected = ev.preference_scores(rm, params, test_pairs, tokenizer, **lengths)
        margins = chosen.astype(np.float64) - rejected
        info.update(
            heldout_accuracy=float(np.mean(margins > 0)),
            heldout_margin=float(np.mean(margins)),
            heldout_pairs=len(test_pairs),
        )
        if normalize:
            scores = np.concatenate([chosen, rejected]).astype(np.float64)
            mean, std = float(scores.mean()), float(scores.std() + 1e-6)
            head = params["head"]
            params["head"] = {"kernel": head["kernel"] / std, "bias": (head["bias"] - mean) / std}
            info.update(score_mean_removed=mean, score_std_removed=std)
    handover.save_reward_model(workdir, cfg, params, tokenizer=tokenizer)
    if distributed.is_primary():
        paths.write_text_atomic(
            paths.as_path(workdir) / INFO_FILE, json.dumps(info, indent=2) + "\n"
        )
    return params, rows, info


def _save_adapter(
    path: Any, cfg: Any, adapters: Any, head: Any, lora: Any, base_model: str | None
) -> None:
    """The trunk's adapters in PEFT's format (naming `base_model`) plus the head beside them."""
    peft_io.save_peft(
        str(path), cfg, adapters["transformer"], lora, base_model_name_or_path=base_model
    )
    head = {k: np.ascontiguousarray(jax.device_get(v), np.float32) for k, v in head.items()}
    paths.save_safetensors(path / handover.HEAD_FILE, head)
