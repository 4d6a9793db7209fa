"""The PPO stage: the KL-regularized objective (seed Eq. 3) with a learned reward model (one
compiled program per iteration, a KL-coefficient sweep as one vmapped program) or with a reward
computed on the host, on decoded texts or on token ids.

    step = make_host_reward_step(fns, my_reward, mesh=mesh, tokenizer=tok, on="text")
    step = make_host_reward_step(fns, exact_match, mesh=mesh, on="tokens")
"""

from __future__ import annotations

import dataclasses
import os
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import data as rdata
from rlhf_jax import distributed, models, sweeps, train
from rlhf_jax import lora as lora_lib
from rlhf_jax import sharding as sh
from rlhf_jax.run import handover, runner
from rlhf_jax.stages.common import Schedule, check_vocab, prompt_loader, save_adapted

# A host reward: one sample per row -> [B] scores. A sample is the decoded prompt + completion
# (on="text", EOS dropped), its token ids (on="tokens", as sampled: EOS kept when emitted), or
# (dataset row index, completion ids without EOS, prompt ids) (on="rows": `run.rewards.RowReward`,
# called with the iteration too; its per-function values are logged as rewards/<name>).
HostReward = Callable[[list[Any]], Any]
REWARD_ON = ("text", "tokens", "rows")


def make_host_reward_step(
    fns: train.PPOFunctions | train.CriticFreeFunctions,
    reward: HostReward,
    *,
    mesh: jax.sharding.Mesh,
    on: str = "text",
    tokenizer: Any = None,
    include_prompt: bool = True,
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """A PPO or critic-free iteration whose reward is a host function, for
    `runner.fit(..., jit=False)`: compiled rollout -> `reward(samples)` on the host -> compiled
    score + update (both programs compiled on the first call).

    Args:
      fns: `train.make_ppo(...)` or `train.make_critic_free(...)` functions (reward_fn=None).
      reward: samples [B] -> scores [B] (e.g. VADER on texts, an exact-match check on ids).
      mesh: the mesh `fit` runs on.
      on: "text" (decoded with `tokenizer`, EOS dropped) or "tokens" (lists of token ids).
      tokenizer: needed for on="text": anything with `decode_batch(id lists)` and `eos_id`.
      include_prompt: samples are prompt + completion (True) or the completion alone.
    Raises:
      ValueError: an unknown `on`, a text reward without a tokenizer, or a reward that returns
        another number of scores than rows (at the first call).
    """
    if on not in REWARD_ON:
        raise ValueError(f"on must be one of {REWARD_ON}, got {on!r}")
    if on in ("text", "rows") and tokenizer is None:
        raise ValueError("a text reward needs the tokenizer that decodes the samples")

    def score_update(state, ro):
        return fns.update(*fns.score(state, ro))

    compiled: dict[str, Any] = {}

    def step(state: Any, batch: Any) -> tuple[Any, Any]:
        if "rollout" not in compiled:
            compiled["rollout"] = sh.compile_step(
                fns.rollout, mesh, state, batch, batch_output=True
            )
        # The iteration a dataset reward logs (a host read of the step: only when it is needed).
        iteration = int(jax.device_get(state.step)) + 1 if on == "rows" else 0
        state, ro = compiled["rollout"](state, batch)
        drop = tokenizer.eos_id if on in ("text", "rows") else None
        # Each host scores the rows its devices hold (all of them on one host); the scores are
        # assembled into one global array like a batch.
        fields = ("query_tokens", "query_mask", "response_tokens", "response_mask")
        mine = types.SimpleNamespace(**distributed.local_rows({k: getattr(ro, k) for k in fields}))
        with_prompt = include_prompt and on != "rows"
        rows = train.response_token_lists(mine, include_query=with_prompt, drop_id=drop)
        if on == "rows":  # prompt-major: G consecutive rollout rows per prompt of the batch
            index = np.asarray(distributed.local_rows({"index": batch["index"]})["index"])
            group = len(rows) // len(index)
            query = [q[m > 0].tolist() for q, m in zip(mine.query_tokens, mine.query_mask)]
            samples = [(int(index[r // group]), ids, query[r]) for r, ids in enumerate(rows)]
            scores = reward(samples, iteration)
        else:
            scores = reward(tokenizer.decode_batch(rows) if on == "text" else rows)
        scores = np.asarray(scores, np.float32).reshape(-1)  # [B_local]
        if scores.shape[0] != len(rows):
            raise ValueError(
                f"the host reward returned {scores.shape[0]} scores for {len(rows)} rows"
            )
        ro = ro.replace(scores=sh.shard_batch(scores, mesh))
        if "update" not in compiled:
            compiled["update"] = sh.compile_step(score_update, mesh, state, ro)
        state, metrics = compiled["update"](state, ro)
        if on == "rows":
            metrics = {**metrics, **_log_rows(reward, iteration, samples, ro, mesh, drop)}
        return state, metrics

    return step


def _log_rows(reward: Any, iteration: int, samples: list, ro: Any, mesh: Any, drop: Any) -> dict:
    """Every host's scored rows of a dataset reward, gathered (a collective: every process
    calls it) in the batch's global order: the primary appends them to the reward's log
    (`RowReward.log`), and each function's mean over the rows it applies to (None / NaN rows
    left out) is returned as `rewards/<name>`."""
    local = {
        "index": np.asarray([s[0] for s in samples], np.int32),
        "values": np.asarray(reward.values, np.float32).T,  # [B_local, functions]
    }
    rows = distributed.to_host({
        **{k: sh.shard_batch(v, mesh) for k, v in local.items()},
        "response_tokens": ro.response_tokens, "response_mask": ro.response_mask,
        "scores": ro.scores,
    })  # fmt: skip
    ids = train.response_token_lists(types.SimpleNamespace(**rows), drop_id=drop)
    reward.log(iteration, rows["index"].tolist(), ids, rows["values"].T, rows["scores"])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a function that applies to no row
        means = np.nanmean(rows["values"], axis=0)
    return {f"rewards/{n}": np.float32(m) for n, m in zip(reward.rewards.names, means)}


make_host_reward_ppo_step = make_host_reward_step  # the name PPO's users know


def train_ppo(
    cfg: models.TransformerConfig,
    params: Any,
    task: Any,
    *,
    workdir: str | os.PathLike,
    mesh: jax.sharding.Mesh,
    schedule: Schedule,
    ppo: train.PPOConfig,
    value_learning_rate: float,
    reward_model: tuple[models.TransformerConfig, Any] | None = None,
    host_reward: HostReward | None = None,
    reward_on: str = "text",
    kl_coefs: Sequence[float] | None = None,
    max_prompt_length: int,
    seed: int = 0,
    eval_fn: Callable[[Any, int], dict] | None = None,
    progress: bool = True,
    lora: Any = None,
    quantize: str = "none",
    base_model: str | None = None,
    prompts: Any = None,
    tokenizer: Any = None,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, list[dict]]:
    """PPO from `params` (policy and frozen reference) on the task's training prompts, or on the
    batches of `prompts` (a loader, e.g. `stages.rewards.prompt_rows_loader` of a dataset, with
    its `tokenizer`; `task` may then be None).

    Exactly one reward: `reward_model` = (its config, its params) scores inside the compiled
    iteration (`train.reward_model_fn`), and the critic starts from its trunk; or `host_reward`
    (on decoded texts or token ids, `make_host_reward_step`), and the critic starts from the
    policy. With `kl_coefs` (reward model only) the runs of each KL coefficient train as one
    vmapped program (`sweeps`); otherwise `ppo.kl_coef`. One run writes `WORKDIR/hf/`.

    With `lora` (a `lora.LoraConfig`) the policy trains adapters on `params` (quantized with
    `quantize`: QLoRA), which stay frozen and are also the reference; the critic trains adapters
    and its head on the reward model's trunk (or, with a host reward, on that same base). No
    weights are copied: the state holds one base, the reward model, and what trains. A run
    writes the policy's adapters (`WORKDIR/adapter/`, PEFT) and the merged `WORKDIR/hf/`.

    Args:
      schedule: steps, prompts per iteration (batch_size), the policy's learning rate and its
        warmup / decay, intervals; the critic uses the same schedule at `value_learning_rate`.
      eval_fn: `(state, step) -> dict` for `runner.fit` (a sweep state with `kl_coefs`).
      base_model: a LoRA run's starting HF folder, named as the base in the PEFT adapter's
        adapter_config.json (`base_model_name_or_path`).
      callbacks: `runner.fit` hooks (`run.callbacks`; e.g. `run.samples.CompletionSamples`),
        which see the policy through `Event.policy()`.

    Returns:
      (final policy params (stacked over kl_coefs for a sweep), metrics rows).
    """
    if (reward_model is None) == (host_reward is None):
        raise ValueError("pass exactly one of reward_model and host_reward")
    if kl_coefs is not None and host_reward is not None:
        raise ValueError("a KL-coefficient sweep needs the reward model (one compiled program)")
    tok = tokenizer or rdata.task_tokenizer(task)
    check_vocab(cfg, tok, name="tokenizer" if tokenizer is not None else "the task's tokenizer")
    popt = schedule.optimizer()
    vopt = dataclasses.replace(schedule, learning_rate=value_learning_rate).optimizer()
    rng_value = jax.random.PRNGKey(seed)
    if reward_model is not None:
        value_cfg, reward_params = reward_model
        reward_fn = train.reward_model_fn(models.RewardModel(value_cfg))
        value_params = models.init_value_params(value_cfg, rng_value, reward_params["transformer"])
    else:
        value_cfg, reward_params, reward_fn = cfg, None, None
        value_params = models.init_value_params(cfg, rng_value, params)
    nets = (models.Transformer(cfg), models.ValueModel(value_cfg))
    policy_params, ref_params = params, params
    if lora is not None:  # adapters on the frozen base (the reference) and on the critic's trunk
        rng_lora = jax.random.PRNGKey(seed)
        policy_params, ref_params = lora_lib.prepare(params, lora, rng_lora, quantize=quantize)
        value_adapters = lora_lib.init_adapters(value_params, lora, jax.random.fold_in(rng_lora, 1))
        value_params = lora_lib.trained(value_adapters, {"head": value_params["head"]})
        nets = (lora_lib.LoraTransformer(cfg, lora), lora_lib.LoraValueModel(value_cfg, lora))
    fns = train.make_ppo(*nets, popt, vopt, ppo, reward_fn=reward_fn)

    def state_for(kl_coef: float) -> train.PPOState:
        return train.create_ppo_state(
            dataclasses.replace(ppo, kl_coef=kl_coef),
            policy_params=policy_params,
            value_params=value_params,
            ref_params=ref_params,
            policy_optimizer=popt,
            value_optimizer=vopt,
            rng=seed,
            reward_params=reward_params,
        )

    loader = prompts or prompt_loader(
        task, batch_size=schedule.local_batch_size, max_prompt_length=max_prompt_length, seed=seed
    )
    common = dict(
        workdir=workdir, mesh=mesh, eval_fn=eval_fn, progress=progress, callbacks=callbacks
    )
    if kl_coefs is not None:
        states = sweeps.stack_sweep([state_for(k) for k in kl_coefs])
        state, rows = runner.fit(
            sweeps.sweep_step(fns.step), states, loader, desc="ppo sweep", **common,
            **schedule.fit_kwargs(),
        )  # fmt: skip
        policy = state["members"].policy_params
        if lora is not None:
            policy = jax.vmap(lambda a: lora_lib.merge(ref_params, a, lora))(policy)
        return policy, rows
    if host_reward is None:
        step, jit, desc = fns.step, True, "ppo"
    else:
        step = make_host_reward_step(fns, host_reward, mesh=mesh, on=reward_on, tokenizer=tok)
        jit, desc = False, "ppo (host reward)"
    desc += " (lora)" if lora is not None else ""

    def policy(state: Any) -> tuple[Any, Any]:
        return nets[0], train.ppo.policy_view(nets[0], state.policy_params, state.ref_params)

    state, rows = runner.fit(
        step, state_for(ppo.kl_coef), loader, desc=desc, jit=jit, policy=policy, **common,
        **schedule.fit_kwargs(),
    )  # fmt: skip
    if lora is not None:
        return save_adapted(
            workdir, cfg, ref_params, state.policy_params, lora, tok, base_model
        ), rows
    handover.save_lm(workdir, cfg, state.policy_params, tokenizer=tok)
    return state.policy_params, rows
