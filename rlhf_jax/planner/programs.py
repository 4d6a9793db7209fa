"""The programs a plan compiles: every step of a method (SFT, reward model, the DPO family, PPO,
the critic-free methods) and the sampler, as functions of abstract inputs built from a `PlanSpec`
with the project's own partition rules, and the model FLOPs of their tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import lora as lora_lib
from rlhf_jax import models, paths, train
from rlhf_jax.planner.spec import PlanSpec
from rlhf_jax.sampling import generate


@dataclasses.dataclass
class Program:
    """A step to compile: the function, abstract state and batch, what it costs in model FLOPs
    and tokens, and how many tokens it decodes (for the memory term)."""

    name: str
    fn: Callable[[Any, Any], Any]
    state: Any
    batch: Any
    model_flops: float
    tokens: int
    decode_steps: int = 0
    donate: bool = True


def _abstract(fn: Callable[[], Any]) -> Any:
    return jax.eval_shape(fn)


def _spec_batch(shape: tuple[int, ...], dtype=jnp.int32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def base_config(model: str, **overrides: Any) -> models.TransformerConfig:
    """A preset name (`models.PRESETS`), or a Hugging Face folder (or its config.json), read from
    config.json alone, with `overrides`.

    Raises:
      ValueError: neither a preset nor a folder with config.json, or an unsupported model_type.
    """
    if model in models.PRESETS:
        return models.get_config(model, **overrides)
    folder = model[: -len("config.json")] if model.endswith("config.json") else model
    if not (paths.as_path(folder or ".") / "config.json").is_file():
        raise ValueError(
            f"{model!r} is neither a preset ({', '.join(sorted(models.PRESETS))}) nor a folder "
            "with a config.json"
        )
    return models.config_from_pretrained(folder or ".", **overrides)


def model_config(spec: PlanSpec) -> models.TransformerConfig:
    """The preset or HF folder of `spec.model` with the plan's numerics (dtype, remat,
    logits_chunk, scan_layers)."""
    probe = base_config(spec.model, **dict(spec.model_overrides))
    return base_config(
        spec.model,
        dtype=spec.dtype,
        remat=spec.remat,
        logits_chunk=spec.logits_chunk,
        scan_layers=spec.scan_layers,
        max_len=max(probe.max_len, spec.seq_len),
        **dict(spec.model_overrides),
    )


def _train_flops_per_token(cfg: models.TransformerConfig, spec: PlanSpec) -> float:
    """Model FLOPs of a trained token: forward + backward (6N + 12LTHDh); under LoRA the frozen
    weights get no gradient, so forward + the activations' gradient (4N + 8LTHDh; the adapters'
    own FLOPs, under 1 %, are left out)."""
    if spec.lora_rank:
        return 2.0 * cfg.flops_per_token(spec.seq_len, backward=False)
    return cfg.flops_per_token(spec.seq_len)


def programs(spec: PlanSpec) -> list[Program]:
    """The compiled programs of `spec`: its training step (for RL the whole iteration: sampling,
    scoring with a reward model, the update) and, for RL, the sampler alone."""
    cfg = model_config(spec)
    tx = train.make_optimizer(1e-5)
    lcfg = (
        lora_lib.LoraConfig(rank=spec.lora_rank, alpha=2.0 * spec.lora_rank)
        if spec.lora_rank
        else None
    )
    params = _abstract(lambda: models.init_params(cfg, jax.random.key(0)))

    def trained_and_base(tree):
        """(trained tree, frozen base or None) of a full tree under the plan's LoRA."""
        if lcfg is None:
            return tree, None
        adapters = jax.eval_shape(
            lambda p: lora_lib.init_adapters(p, lcfg, jax.random.key(1)), tree
        )
        base = tree
        if spec.quantize != "none":
            base = jax.eval_shape(lambda p: lora_lib.quantize_base(p, spec.quantize), tree)
        return adapters, base

    fpt_train = _train_flops_per_token(cfg, spec)
    fpt_fwd = cfg.flops_per_token(spec.seq_len, backward=False)
    b, t, k = spec.batch, spec.seq_len, spec.microbatches
    if spec.algo == "sft":
        model = models.Transformer(cfg) if lcfg is None else lora_lib.LoraTransformer(cfg, lcfg)
        loss = train.make_sft_loss(model)
        trained, base = trained_and_base(params)
        loss = loss if base is None else lora_lib.lora_loss(loss)
        frozen = None if base is None else {"base": base}
        state = jax.eval_shape(
            lambda tr, fr: train.create_train_state(tr, tx, 0, frozen=fr), trained, frozen
        )
        batch = {n: _spec_batch((b, t)) for n in ("tokens", "attention_mask", "loss_mask")}
        step = train.make_step(loss, tx, microbatches=k)
        return [Program("step", step, state, batch, b * t * fpt_train, b * t)]
    pairs = {f"{s}_{n}": _spec_batch((b, t)) for s in ("chosen", "rejected")
             for n in ("tokens", "attention_mask", "loss_mask")}  # fmt: skip
    if spec.algo == "reward":
        rm_params = _abstract(lambda: models.init_reward_params(cfg, jax.random.key(0)))
        if lcfg is None:
            rm, loss = models.RewardModel(cfg), None
            state = jax.eval_shape(lambda tr: train.create_train_state(tr, tx, 0), rm_params)
            loss = train.make_reward_loss(rm)
        else:
            adapters, base = trained_and_base(rm_params)
            rm = lora_lib.LoraRewardModel(cfg, lcfg)
            tr = lora_lib.trained(adapters, {"head": rm_params["head"]})
            trunk = {"transformer": base["transformer"]}
            state = jax.eval_shape(
                lambda tr, fr: train.create_train_state(tr, tx, 0, frozen=fr), tr, {"base": trunk}
            )
            loss = lora_lib.lora_loss(train.make_reward_loss(rm))
        step = train.make_step(loss, tx, microbatches=k)
        return [Program("step", step, state, pairs, 2 * b * t * fpt_train, 2 * b * t)]
    if spec.algo == "dpo":
        trained, base = trained_and_base(params)
        model = models.Transformer(cfg) if lcfg is None else lora_lib.LoraTransformer(cfg, lcfg)
        loss = train.make_dpo_loss(model, loss_type=spec.loss_type)
        hp = {"beta": 0.1}
        free = spec.loss_type in train.dpo.REFERENCE_FREE  # no reference at all
        if base is not None:
            loss, frozen = lora_lib.lora_loss(loss), {"base": base}
            if spec.ref == "precomputed" or free:
                frozen = {"base": base, "ref": None}
        else:
            frozen = params if spec.ref == "model" and not free else None
        state = jax.eval_shape(
            lambda tr, fr: train.create_train_state(tr, tx, 0, frozen=fr, hparams=hp),
            trained,
            frozen,
        )
        batch = dict(pairs)
        flops = 2 * b * t * fpt_train
        if spec.ref == "precomputed" and not free:
            batch.update({n: _spec_batch((b,), jnp.float32) for n in train.dpo.REFERENCE_KEYS})
        elif not free:
            flops += 2 * b * t * fpt_fwd
        step = train.make_step(loss, tx, microbatches=k)
        return [Program("step", step, state, batch, flops, 2 * b * t)]
    return _rl_programs(spec, cfg, tx, lcfg, params, trained_and_base)


def _rl_programs(spec, cfg, tx, lcfg, params, trained_and_base) -> list[Program]:
    n = spec.max_new_tokens
    p = spec.seq_len - n
    fpt_train = _train_flops_per_token(cfg, spec)
    prompts = {
        "prompt_tokens": _spec_batch((spec.batch, p)),
        "prompt_mask": _spec_batch((spec.batch, p)),
    }
    fpt_fwd = cfg.flops_per_token(spec.seq_len, backward=False)
    decode_fpt = cfg.flops_per_token(spec.seq_len, backward=False)  # an upper bound per new token
    rm_params = _abstract(lambda: models.init_reward_params(cfg, jax.random.key(0)))
    trained, base = trained_and_base(params)
    policy = models.Transformer(cfg) if lcfg is None else lora_lib.LoraTransformer(cfg, lcfg)
    rows = spec.batch if spec.algo == "ppo" else spec.batch * spec.group_size
    toks = rows * spec.seq_len
    if spec.algo == "ppo":
        value_full = _abstract(lambda: models.init_value_params(cfg, jax.random.key(2)))
        value_model = models.ValueModel(cfg)
        value = value_full
        if lcfg is not None:
            v_ad = jax.eval_shape(
                lambda v: lora_lib.init_adapters(v, lcfg, jax.random.key(3)), value_full
            )
            value = lora_lib.trained(v_ad, {"head": value_full["head"]})
            value_model = lora_lib.LoraValueModel(cfg, lcfg)
        ppo = train.PPOConfig(max_new_tokens=n, ppo_epochs=spec.ppo_epochs,
                              num_minibatches=spec.microbatches, eos_id=1)  # fmt: skip
        reward_fn = train.reward_model_fn(models.RewardModel(cfg))
        fns = train.make_ppo(policy, value_model, tx, tx, ppo, reward_fn=reward_fn)
        ref = params if base is None else base
        state = jax.eval_shape(
            lambda tr, v, r, rm: train.create_ppo_state(
                ppo, policy_params=tr, value_params=v, ref_params=r, policy_optimizer=tx,
                value_optimizer=tx, rng=0, reward_params=rm),
            trained, value, ref, rm_params,
        )  # fmt: skip
        # Sampling, then policy / reference / value / reward forwards, then the updates of
        # policy and critic.
        flops = rows * n * decode_fpt + 4 * toks * fpt_fwd + spec.ppo_epochs * 2 * toks * fpt_train
        step = fns.step
    else:
        cf = train.CriticFreeConfig(algo=spec.algo, group_size=spec.group_size, max_new_tokens=n,
                                    num_minibatches=spec.microbatches, eos_id=1)  # fmt: skip
        fns = train.make_critic_free(policy, tx, cf, reward_fn=models.RewardModel(cfg))
        state = jax.eval_shape(
            lambda tr, r, rm, bs: train.create_critic_free_state(
                tr, tx, 0, ref_params=r, reward_params=rm, base_params=bs, kl_coef=0.05),
            trained, params if base is None else None, rm_params, base,
        )  # fmt: skip
        flops = rows * n * decode_fpt + 3 * toks * fpt_fwd + toks * fpt_train
        step = fns.step
    policy_params = trained if base is None else lora_lib.view(trained, base)
    gen_state = {"params": policy_params}
    num_samples = 1 if spec.algo == "ppo" else spec.group_size

    def sample(state, batch):
        out = generate(
            policy,
            state["params"],
            batch["prompt_tokens"],
            batch["prompt_mask"],
            jax.random.key(0),
            max_new_tokens=n,
            eos_id=1,
            num_samples=num_samples,
        )
        return state, out

    return [
        Program("step", step, state, prompts, flops, toks, decode_steps=n),
        Program(
            "generate",
            sample,
            gen_state,
            prompts,
            rows * n * decode_fpt,
            rows * n,
            decode_steps=n,
            donate=False,
        ),  # fmt: skip
    ]
