"""The stages of the frontier experiment, one function each (`stage_sft_model`, `stage_sft`,
`stage_pairs`, `stage_reward_model`, `stage_dpo`, `stage_ppo`, `stage_ppo_gt`,
`stage_critic_free`, `stage_unlikelihood`, `stage_best_of_n`): each trains through the library's
stage functions (`rlhf_jax.stages`), is resumable, and writes its (KL, reward) points."""

from __future__ import annotations

import json
from typing import Any

import jax

from rlhf_jax import eval as ev
from rlhf_jax import models, pairs, paths, stages, sweeps, train
from rlhf_jax.data import synthetic
from rlhf_jax.frontier import results as fr
from rlhf_jax.frontier.context import Context, done_points, points_path, rows_from_metrics
from rlhf_jax.run import handover, runner


def stage_sft_model(ctx: Context) -> None:
    """Trains (or reloads) the SFT model of every seed into WORKDIR/sft/ (the first seed's)."""
    c, wd = ctx.config, paths.as_path(ctx.config.workdir) / "sft"
    if not (wd / handover.HF_DIR).is_dir():
        params = models.init_params(ctx.cfg, jax.random.PRNGKey(c.seeds[0]))
        stages.train_sft(
            ctx.task,
            ctx.cfg,
            params,
            workdir=wd,
            mesh=ctx.mesh,
            schedule=ctx.schedule(
                c.sft_steps, c.sft_batch_size, c.sft_lr, warmup_steps=c.sft_steps // 10,
                weight_decay=0.01,
            ),
            max_length=ctx.lengths["max_length"],
            seed=c.seeds[0],
            progress=c.progress,
        )  # fmt: skip
    _, ctx.sft_params = handover.load_init_params(wd)


def stage_sft(ctx: Context) -> list[dict]:
    """The SFT policy evaluated with this seed's key: the KL = 0 point."""
    if (points := done_points(ctx, "sft")) is not None:
        return points
    kl, reward, stderr, texts = ctx.evaluate(ctx.sft_params, texts=True)
    paths.write_text_atomic(ctx.root / "sft" / "samples.txt", "\n".join(texts) + "\n")
    print("sft samples:\n  " + "\n  ".join(texts[:3]))
    points = [fr.make_row("sft", "", ctx.seed, 0, kl, reward, stderr)]
    fr.write_csv(points_path(ctx, "sft"), points)
    return points


def stage_pairs(ctx: Context) -> tuple[list, list]:
    """k completions per prefix from the SFT model, all pairs labelled by VADER (cached); the
    held-out pairs come from test prefixes after the evaluation prompts (disjoint from them)."""
    c = ctx.config
    common = dict(
        seed=ctx.seed,
        sampling=ctx.sampling,
        completions_per_prompt=c.completions_per_prompt,
        max_prompt_length=c.max_prompt_length,
        batch_size=512,
    )
    train_pairs = pairs.task_preference_pairs(
        ctx.task, ctx.model, ctx.sft_params, split="train", num_prompts=c.pair_prompts,
        cache_path=ctx.root / "pairs" / "train.jsonl", **common,
    )  # fmt: skip
    heldout = pairs.task_preference_pairs(
        ctx.task, ctx.model, ctx.sft_params, split="test", first_prompt=c.eval_prompts,
        num_prompts=c.heldout_prompts, cache_path=ctx.root / "pairs" / "heldout.jsonl", **common,
    )  # fmt: skip
    return train_pairs, heldout


def stage_reward_model(ctx: Context, train_pairs: list, heldout: list) -> dict:
    """Bradley-Terry reward model from the SFT model; held-out accuracy; scores normalised to
    mean 0 and std 1 on the held-out pairs (the PPO reward scale)."""
    c = ctx.config
    ctx.rm_params, _, info = stages.train_reward_model(
        ctx.cfg,
        ctx.sft_params,
        train_pairs,
        heldout,
        ctx.tok,
        workdir=ctx.root / "reward_model",
        mesh=ctx.mesh,
        schedule=ctx.schedule(
            c.rm_steps, c.rm_batch_size, c.rm_lr, warmup_steps=c.rm_steps // 10, weight_decay=0.01
        ),
        seed=ctx.seed,
        normalize=True,
        progress=c.progress,
        **ctx.lengths,
    )
    return info


def stage_dpo(ctx: Context) -> tuple[list[dict], dict]:
    """DPO over the beta sweep as one vmapped program, evaluated every dpo_eval_every steps."""
    c, wd = ctx.config, ctx.root / "dpo"
    timing_path = wd / "timing.json"
    first = ctx.seed == c.seeds[0]  # the first seed times the vmapped sweep
    if (points := done_points(ctx, "dpo")) is not None:
        return points, json.loads(timing_path.read_text()) if first else None
    _, rows, info = stages.train_dpo(
        ctx.cfg,
        ctx.sft_params,
        ctx.train_pairs,
        ctx.tok,
        workdir=wd,
        mesh=ctx.mesh,
        schedule=ctx.schedule(
            c.dpo_steps, c.dpo_batch_size, c.dpo_lr, warmup_steps=c.dpo_steps // 10,
            decay=False, eval_every=c.dpo_eval_every,
        ),
        betas=c.dpo_betas,
        precompute_reference=True,
        seed=ctx.seed,
        eval_fn=ctx.sweep_eval(len(c.dpo_betas), lambda s: s.params),
        time_sweep_steps=c.timing_steps if first else 0,
        progress=c.progress,
        **ctx.lengths,
    )  # fmt: skip
    members = [("dpo", f"beta={b:g}") for b in c.dpo_betas]
    points = rows_from_metrics(rows, members, ctx.seed)
    fr.write_csv(points_path(ctx, "dpo"), points)
    return points, info["timing"] if first else None


def _ppo(ctx: Context, name: str, kl_coef: float, **kwargs: Any) -> list[dict]:
    c = ctx.config
    _, rows = stages.train_ppo(
        ctx.cfg,
        ctx.sft_params,
        ctx.task,
        workdir=ctx.root / name,
        mesh=ctx.mesh,
        schedule=ctx.schedule(
            c.ppo_steps, c.ppo_batch_size, c.ppo_lr, warmup_steps=max(c.ppo_steps // 10, 1),
            decay=False, eval_every=c.ppo_eval_every,
        ),
        ppo=train.PPOConfig(
            kl_coef=kl_coef, ppo_epochs=c.ppo_epochs, num_minibatches=c.ppo_minibatches,
            temperature=c.temperature, max_new_tokens=c.max_new_tokens, eos_id=ctx.tok.eos_id,
            pad_id=ctx.tok.pad_id,
        ),
        value_learning_rate=c.ppo_lr,
        max_prompt_length=c.max_prompt_length,
        seed=ctx.seed,
        progress=c.progress,
        **kwargs,
    )  # fmt: skip
    return rows


def stage_ppo(ctx: Context) -> list[dict]:
    """PPO on the learned reward model, the KL-coefficient sweep as one vmapped program."""
    c = ctx.config
    if (points := done_points(ctx, "ppo")) is not None:
        return points
    rows = _ppo(
        ctx, "ppo", c.ppo_kl_coefs[0], reward_model=(ctx.cfg, ctx.rm_params),
        kl_coefs=c.ppo_kl_coefs,
        eval_fn=ctx.sweep_eval(len(c.ppo_kl_coefs), lambda s: s.policy_params),
    )  # fmt: skip
    members = [("ppo", f"kl_coef={k:g}") for k in c.ppo_kl_coefs]
    points = rows_from_metrics(rows, members, ctx.seed)
    fr.write_csv(points_path(ctx, "ppo"), points)
    return points


def stage_ppo_gt(ctx: Context) -> list[dict]:
    """PPO on the ground-truth reward: compiled rollout -> host VADER -> compiled update."""
    c = ctx.config
    if (points := done_points(ctx, "ppo_gt")) is not None:
        return points

    def eval_fn(state, step):
        return dict(zip(("kl/0", "reward/0", "stderr/0"), ctx.evaluate(state.policy_params)[:3]))

    rows = _ppo(
        ctx, "ppo_gt", c.ppo_gt_kl_coef, host_reward=synthetic.ground_truth_reward,
        reward_on="text", eval_fn=eval_fn,
    )  # fmt: skip
    points = rows_from_metrics(rows, [("ppo-gt", f"kl_coef={c.ppo_gt_kl_coef:g}")], ctx.seed)
    fr.write_csv(points_path(ctx, "ppo_gt"), points)
    return points


def stage_critic_free(ctx: Context, algo: str) -> list[dict]:
    """GRPO (β k3 in the loss, its paper's form) or RLOO (β k1 in the reward, Eq. 3) on the
    learned reward model, the KL-coefficient sweep as one vmapped program."""
    c = ctx.config
    if (points := done_points(ctx, algo)) is not None:
        return points
    schedule = ctx.schedule(
        c.cf_steps, c.cf_prompts, c.cf_lr, warmup_steps=max(c.cf_steps // 10, 1), decay=False,
        eval_every=c.cf_eval_every,
    )  # fmt: skip
    rl = train.CriticFreeConfig(
        algo=algo, group_size=c.cf_group_size, kl_in="loss" if algo == "grpo" else "reward",
        temperature=c.temperature, max_new_tokens=c.max_new_tokens, eos_id=ctx.tok.eos_id,
        pad_id=ctx.tok.pad_id,
    )  # fmt: skip
    loader = stages.prompt_loader(
        ctx.task, batch_size=schedule.local_batch_size, max_prompt_length=c.max_prompt_length,
        seed=ctx.seed,
    )  # fmt: skip
    _, rows = stages.train_critic_free(
        ctx.cfg, ctx.sft_params, loader, workdir=ctx.root / algo, mesh=ctx.mesh,
        schedule=schedule, rl=rl, reward_model=(ctx.cfg, ctx.rm_params), kl_coefs=c.cf_kl_coefs,
        seed=ctx.seed, eval_fn=ctx.sweep_eval(len(c.cf_kl_coefs), lambda s: s.params),
        progress=c.progress,
    )  # fmt: skip
    members = [(algo, f"kl_coef={k:g}") for k in c.cf_kl_coefs]
    points = rows_from_metrics(rows, members, ctx.seed)
    fr.write_csv(points_path(ctx, algo), points)
    return points


def stage_unlikelihood(ctx: Context) -> list[dict]:
    """Preferred-FT (alpha = 0) and Unlikelihood (alpha > 0) as one vmapped program."""
    c = ctx.config
    if (points := done_points(ctx, "unlikelihood")) is not None:
        return points
    alphas = (0.0, *c.unlikelihood_alphas)
    schedule = ctx.schedule(
        c.ft_steps, c.ft_batch_size, c.ft_lr, warmup_steps=c.ft_steps // 10, decay=False,
        eval_every=c.ft_eval_every,
    )  # fmt: skip
    opt = schedule.optimizer()
    states = sweeps.stack_sweep(
        [
            train.create_train_state(ctx.sft_params, opt, ctx.seed, hparams={"alpha": a})
            for a in alphas
        ]
    )
    _, rows = runner.fit(
        sweeps.sweep_step(train.make_unlikelihood_step(ctx.model, opt)),
        states,
        stages.preference_loader(
            ctx.train_pairs, ctx.tok, batch_size=schedule.local_batch_size, seed=ctx.seed,
            **ctx.lengths,
        ),
        workdir=ctx.root / "unlikelihood",
        mesh=ctx.mesh,
        eval_fn=ctx.sweep_eval(len(alphas), lambda s: s.params),
        desc="unlikelihood",
        progress=c.progress,
        **schedule.fit_kwargs(),
    )  # fmt: skip
    members = [("preferred-ft", "chosen-nll")]
    members += [("unlikelihood", f"alpha={a:g}") for a in c.unlikelihood_alphas]
    points = rows_from_metrics(rows, members, ctx.seed)
    fr.write_csv(points_path(ctx, "unlikelihood"), points)
    return points


def stage_best_of_n(ctx: Context) -> list[dict]:
    """Best-of-N samples of the SFT model ranked by the learned reward model."""
    c = ctx.config
    if (points := done_points(ctx, "best_of_n")) is not None:
        return points
    batch = {k: v[: c.bon_prompts] for k, v in ctx.eval_batch.items()}
    # The reward model in chunks of bon_prompts rows: one compiled shape for every N.
    score_fn = ev.reward_model_score_fn(ctx.rm_model, ctx.rm_params, batch_size=c.bon_prompts)
    points = []
    for n in c.bon_ns:
        res = ev.best_of_n(
            ctx.model,
            ctx.sft_params,
            batch,
            jax.random.fold_in(ctx.eval_rng, n),
            n=n,
            sampling=ctx.sampling,
            score_fn=score_fn,
            reward_fn=synthetic.ground_truth_reward,
            tokenizer=ctx.tok,
            eos_id=ctx.tok.eos_id,
            pad_id=ctx.tok.pad_id,
            batch_size=c.bon_prompts,  # one compiled shape for every N
        )
        points.append(
            fr.make_row(
                "best-of-n", f"n={n}", ctx.seed, 0, res.kl, res.reward_mean, res.reward_stderr
            )
        )
    fr.write_csv(points_path(ctx, "best_of_n"), points)
    return points
