"""The reward-model stage: a Bradley-Terry reward model (seed Eq. 2) initialised from the SFT
model, with its held-out pair accuracy (`eval.preference_accuracy`, the one accuracy function)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import data as rdata
from rlhf_jax import eval as ev
from rlhf_jax import handover, models, runner, train
from rlhf_jax import sharding as sh
from rlhf_jax.stages.common import Schedule, preference_loader

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
) -> tuple[Any, list[dict], dict[str, Any]]:
    """Trains a `RewardModel` (trunk = `lm_params`, head ~ N(0, 1/sqrt(D+1)) from PRNGKey(seed))
    on `train_pairs`; evaluates the held-out accuracy on `test_pairs` every
    `schedule.eval_every` steps and at the end (eval/accuracy, eval/margin); writes
    `WORKDIR/reward_model/` (`handover.save_reward_model`) and `WORKDIR/reward_model_eval.json`.

    With `normalize`, the head is rescaled so that the scores of the held-out pairs have mean 0
    and standard deviation 1 (a fixed reward scale for PPO).

    Returns:
      (params, metrics rows, info: heldout_accuracy, heldout_margin, heldout_pairs, train_pairs,
      train_accuracy_last_log, and with `normalize` the mean/std removed).
    """
    rm = models.RewardModel(cfg)
    params = models.init_reward_params(cfg, jax.random.PRNGKey(seed), lm_params)
    opt = schedule.optimizer()
    lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    loader = preference_loader(
        train_pairs, tokenizer, batch_size=schedule.local_batch_size, seed=seed, **lengths
    )

    def eval_fn(state, step):
        return ev.preference_accuracy(rm, state.params, test_pairs, tokenizer, **lengths)

    state, rows = runner.fit(
        train.make_reward_step(rm, opt),
        train.create_train_state(params, opt, seed),
        loader,
        workdir=workdir,
        mesh=mesh,
        eval_fn=eval_fn if test_pairs else None,
        desc="reward model",
        progress=progress,
        **schedule.fit_kwargs(),
    )
    params = jax.device_get(state.params)
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
    if sh.is_primary():
        (Path(workdir) / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return params, rows, info
