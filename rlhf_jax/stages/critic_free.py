"""The critic-free stage: GRPO, Dr. GRPO, DAPO, GSPO, RLOO or REINFORCE++ (`train.CriticFreeConfig`)
from a policy that is also the frozen reference, with a reward that is a JAX function on token
ids, a learned reward model (both: one compiled program per iteration; a KL-coefficient sweep as
one vmapped program) or a host function on decoded texts or token ids.

    params, rows = stages.train_critic_free(cfg, params, loader, workdir=..., mesh=mesh,
                                            schedule=..., rl=train.CriticFreeConfig(algo="rloo"),
                                            reward_model=(rm_cfg, rm_params), kl_coefs=(0.05, 0.2))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from rlhf_jax import lora as lora_lib
from rlhf_jax import models, sweeps, train
from rlhf_jax.run import handover, runner
from rlhf_jax.stages.common import Schedule, check_vocab, save_adapted
from rlhf_jax.stages.ppo import HostReward, make_host_reward_step


def train_critic_free(
    cfg: models.TransformerConfig,
    params: Any,
    loader: Iterable[Any],
    *,
    workdir: str | os.PathLike,
    mesh: jax.sharding.Mesh,
    schedule: Schedule,
    rl: train.CriticFreeConfig,
    reward_fn: train.critic_free.RewardFn | None = None,
    reward_model: tuple[models.TransformerConfig, Any] | None = None,
    host_reward: HostReward | None = None,
    reward_on: str = "text",
    tokenizer: Any = None,
    kl_coef: float = 0.0,
    kl_coefs: Sequence[float] | None = None,
    seed: int = 0,
    eval_fn: Callable[[Any, int], dict] | None = None,
    progress: bool = True,
    lora: Any = None,
    quantize: str = "none",
    base_model: str | None = None,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, list[dict]]:
    """A critic-free run from `params` on the prompt batches of `loader` (`schedule.batch_size`
    prompts per iteration, each sampled `rl.group_size` times).

    Exactly one reward: `reward_fn` (JAX, on token ids), `reward_model` = (its config, its
    params), both inside the compiled iteration, or `host_reward` (on decoded texts with
    `tokenizer`, or token ids: `stages.make_host_reward_step`). With `kl_coef > 0` or a
    `kl_coefs` sweep, `params` is also the frozen reference (`rl.kl_in` places the term); a sweep
    (device rewards only) trains as one vmapped program. A single run writes `WORKDIR/hf/`.

    With `lora` (a `lora.LoraConfig`) only adapters train; `params` is their frozen base
    (quantized with `quantize`: QLoRA) and, adapters off, the reference. The state's params are
    then the adapters (the policy is `{"base": frozen["base"], "lora": params}`); a single run
    also writes `WORKDIR/adapter/` (PEFT) and hf/ holds the merged model.

    Args:
      base_model: a LoRA run's starting HF folder, named as the base in the PEFT adapter's
        adapter_config.json (`base_model_name_or_path`).
      callbacks: `runner.fit` hooks (`run.callbacks`; e.g. `run.samples.CompletionSamples`),
        which see the policy through `Event.policy()`.

    Returns:
      (final policy params (stacked over kl_coefs for a sweep), metrics rows).
    """
    rewards = [x for x in (reward_fn, reward_model, host_reward) if x is not None]
    if len(rewards) != 1:
        raise ValueError("pass exactly one of reward_fn, reward_model and host_reward")
    if kl_coefs is not None and host_reward is not None:
        raise ValueError("a KL-coefficient sweep needs a reward on the device (one program)")
    check_vocab(cfg, tokenizer)
    opt = schedule.optimizer()
    model = models.Transformer(cfg) if lora is None else lora_lib.LoraTransformer(cfg, lora)
    trained, base = params, None
    if lora is not None:
        trained, base = lora_lib.prepare(params, lora, jax.random.PRNGKey(seed), quantize=quantize)
    reward_params = None
    if reward_model is not None:
        rm_cfg, reward_params = reward_model
        reward_fn = models.RewardModel(rm_cfg)
    fns = train.make_critic_free(model, opt, rl, reward_fn=reward_fn)

    def state_for(beta: float) -> Any:
        kl = {}
        if beta or kl_coefs is not None:  # the reference: the SFT model, or (LoRA) the base
            kl = {"kl_coef": beta} if lora is not None else {"ref_params": params, "kl_coef": beta}
        return train.create_critic_free_state(
            trained, opt, seed, reward_params=reward_params, base_params=base, **kl
        )

    common = dict(
        workdir=workdir, mesh=mesh, eval_fn=eval_fn, progress=progress, callbacks=callbacks
    )
    if kl_coefs is not None:
        states = sweeps.stack_sweep([state_for(k) for k in kl_coefs])
        state, rows = runner.fit(
            sweeps.sweep_step(fns.step), states, loader, desc=f"{rl.algo} sweep", **common,
            **schedule.fit_kwargs(),
        )  # fmt: skip
        if lora is not None:
            b = state["shared"]["frozen"]["base"]
            return jax.vmap(lambda a: lora_lib.merge(b, a, lora))(state["members"].params), rows
        return state["members"].params, rows
    if host_reward is None:
        step, jit, desc = fns.step, True, rl.algo
    else:
        step = make_host_reward_step(fns, host_reward, mesh=mesh, on=reward_on, tokenizer=tokenizer)
        jit, desc = False, f"{rl.algo} (host reward)"

    def policy(state: Any) -> tuple[Any, Any]:
        if lora is None:
            return model, state.params
        return model, lora_lib.view(state.params, state.frozen["base"])

    state, rows = runner.fit(
        step, state_for(kl_coef), loader, desc=desc, jit=jit, policy=policy, **common,
        **schedule.fit_kwargs(),
    )  # fmt: skip
    if lora is not None:
        base = state.frozen["base"]
        return save_adapted(workdir, cfg, base, state.params, lora, tokenizer, base_model), rows
    handover.save_lm(workdir, cfg, state.params, tokenizer=tokenizer)
    return state.params, rows
