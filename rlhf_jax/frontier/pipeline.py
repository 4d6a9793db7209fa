"""The reward-vs-KL frontier experiment (DPO paper, Rafailov et al. 2023, Fig. 2 left) as a
library function, `run_frontier(config)`: `experiments/frontier.py` (`make demo`) is its command
line, and a notebook calls it directly.

Stages, each resumable and each a point source for `frontier.csv`: the SFT model
(`stages.train_sft`), preference pairs of its samples labelled by the ground truth
(`pairs.task_preference_pairs`), a Bradley-Terry reward model (`stages.train_reward_model`,
scores normalised to mean 0 / std 1 on held-out pairs), DPO over a beta sweep as one vmapped
program (`stages.train_dpo`), PPO on the reward model over KL coefficients (one vmapped program)
and PPO-GT on the ground truth on the host (`stages.train_ppo`), GRPO and RLOO on the reward
model (each a KL-coefficient sweep as one vmapped program, `stages.train_critic_free`),
Preferred-FT and Unlikelihood (one vmapped program), Best-of-N with the reward model, and the SFT
policy itself. Every point is (exact sequence KL(π ‖ π_SFT), mean ground-truth reward) on the
same held-out prompts with the same sampling key within a seed (`eval.evaluate_reward_kl`).

Seeds (`config.seeds`): one SFT model (`WORKDIR/sft/`, the reference every KL is measured
against, trained with the first seed), then per seed `WORKDIR/seed_<s>/` with its own preference
pairs, reward model, runs of every method and evaluation key. The bands over seeds therefore
measure what varies between replications of everything after the SFT model. WORKDIR may be a
cloud URL (gs://..., `rlhf_jax.paths`); the synthetic task's --data-dir stays local.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from rlhf_jax import data as rdata
from rlhf_jax import eval as ev
from rlhf_jax import models, pairs, paths, stages, sweeps, train
from rlhf_jax import sharding as sh
from rlhf_jax.data import synthetic
from rlhf_jax.frontier import results as fr
from rlhf_jax.frontier.config import FrontierConfig
from rlhf_jax.run import handover, runner
from rlhf_jax.sampling import SamplingConfig


@dataclasses.dataclass
class Context:
    """What every stage reads: the task, the models and the fixed evaluation prompts."""

    config: FrontierConfig
    root: epath.Path  # this seed's folder (local or cloud)
    mesh: Any
    task: Any
    tok: rdata.Tokenizer
    cfg: models.TransformerConfig
    model: models.Transformer
    rm_model: models.RewardModel
    sft_params: Any = None
    rm_params: Any = None
    train_pairs: list = dataclasses.field(default_factory=list)
    eval_batch: dict = dataclasses.field(default_factory=dict)
    eval_rng: Any = None
    seed: int = 0

    def for_seed(self, seed: int) -> Context:
        """This context for one seed: its folder, its evaluation key, no seed-specific models."""
        return dataclasses.replace(
            self,
            root=paths.as_path(self.config.workdir) / f"seed_{seed}",
            seed=seed,
            eval_rng=jax.random.PRNGKey(seed + 12345),
            rm_params=None,
            train_pairs=[],
        )

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.config.max_new_tokens, self.config.temperature)

    @property
    def lengths(self) -> dict[str, int]:
        c = self.config
        return {
            "max_length": c.max_prompt_length + c.max_new_tokens,
            "max_prompt_length": c.max_prompt_length,
        }

    def evaluate(self, params: Any, *, texts: bool = False) -> tuple[float, float, float, list]:
        """(KL, reward, reward stderr, sample texts) of a policy on the evaluation prompts; the
        same sampling key for every policy (common random numbers)."""
        res = ev.evaluate_reward_kl(
            self.model,
            params,
            self.sft_params,
            self.eval_batch,
            self.eval_rng,
            sampling=self.sampling,
            eos_id=self.tok.eos_id,
            pad_id=self.tok.pad_id,
            reward_fn=synthetic.ground_truth_reward,
            tokenizer=self.tok,
            batch_size=self.config.eval_prompts,
        )
        return res.kl_mean, res.reward_mean, res.reward_stderr, (res.texts[:4] if texts else [])

    def sweep_eval(self, n: int, params_of: Any) -> Any:
        """`eval_fn(state, step)` for `runner.fit`: one (KL, reward) point per sweep member."""

        def eval_fn(state, step):
            out = {}
            for i in range(n):
                kl, reward, stderr, _ = self.evaluate(params_of(sweeps.sweep_member(state, i)))
                out.update({f"kl/{i}": kl, f"reward/{i}": reward, f"stderr/{i}": stderr})
            return out

        return eval_fn

    def schedule(self, steps: int, batch_size: int, lr: float, **kwargs: Any) -> stages.Schedule:
        kwargs.setdefault("checkpoint_every", self.config.checkpoint_every)
        kwargs.setdefault("log_every", kwargs.get("eval_every") or max(steps // 10, 1))
        return stages.Schedule(steps=steps, batch_size=batch_size, learning_rate=lr, **kwargs)


def _points_path(ctx: Context, stage: str) -> epath.Path:
    return ctx.root / stage / "points.csv"


def _done(ctx: Context, stage: str) -> list[dict] | None:
    path = _points_path(ctx, stage)
    return fr.read_csv(path) if path.is_file() else None


def _rows_from_metrics(rows: list[dict], members: list[tuple[str, str]], seed: int) -> list[dict]:
    """Frontier points from `fit`'s metrics rows (eval/kl/i, eval/reward/i, eval/stderr/i)."""
    points = []
    for row in rows:
        for i, (method, hyper) in enumerate(members):
            if f"eval/kl/{i}" in row:
                points.append(
                    fr.make_row(
                        method,
                        hyper,
                        seed,
                        row["step"],
                        row[f"eval/kl/{i}"],
                        row[f"eval/reward/{i}"],
                        row[f"eval/stderr/{i}"],
                    )
                )
    return points


# ---------------------------------------------------------------------------------------------
# Stages.


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
    if (points := _done(ctx, "sft")) is not None:
        return points
    kl, reward, stderr, texts = ctx.evaluate(ctx.sft_params, texts=True)
    paths.write_text_atomic(ctx.root / "sft" / "samples.txt", "\n".join(texts) + "\n")
    print("sft samples:\n  " + "\n  ".join(texts[:3]))
    points = [fr.make_row("sft", "", ctx.seed, 0, kl, reward, stderr)]
    fr.write_csv(_points_path(ctx, "sft"), points)
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
    if (points := _done(ctx, "dpo")) is not None:
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
    points = _rows_from_metrics(rows, members, ctx.seed)
    fr.write_csv(_points_path(ctx, "dpo"), points)
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
    if (points := _done(ctx, "ppo")) is not None:
        return points
    rows = _ppo(
        ctx, "ppo", c.ppo_kl_coefs[0], reward_model=(ctx.cfg, ctx.rm_params),
        kl_coefs=c.ppo_kl_coefs,
        eval_fn=ctx.sweep_eval(len(c.ppo_kl_coefs), lambda s: s.policy_params),
    )  # fmt: skip
    members = [("ppo", f"kl_coef={k:g}") for k in c.ppo_kl_coefs]
    points = _rows_from_metrics(rows, members, ctx.seed)
    fr.write_csv(_points_path(ctx, "ppo"), points)
    return points


def stage_ppo_gt(ctx: Context) -> list[dict]:
    """PPO on the ground-truth reward: compiled rollout -> host VADER -> compiled update."""
    c = ctx.config
    if (points := _done(ctx, "ppo_gt")) is not None:
        return points

    def eval_fn(state, step):
        return dict(zip(("kl/0", "reward/0", "stderr/0"), ctx.evaluate(state.policy_params)[:3]))

    rows = _ppo(
        ctx, "ppo_gt", c.ppo_gt_kl_coef, host_reward=synthetic.ground_truth_reward,
        reward_on="text", eval_fn=eval_fn,
    )  # fmt: skip
    points = _rows_from_metrics(rows, [("ppo-gt", f"kl_coef={c.ppo_gt_kl_coef:g}")], ctx.seed)
    fr.write_csv(_points_path(ctx, "ppo_gt"), points)
    return points


def stage_critic_free(ctx: Context, algo: str) -> list[dict]:
    """GRPO (β k3 in the loss, its paper's form) or RLOO (β k1 in the reward, Eq. 3) on the
    learned reward model, the KL-coefficient sweep as one vmapped program."""
    c = ctx.config
    if (points := _done(ctx, algo)) is not None:
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
    points = _rows_from_metrics(rows, members, ctx.seed)
    fr.write_csv(_points_path(ctx, algo), points)
    return points


def stage_unlikelihood(ctx: Context) -> list[dict]:
    """Preferred-FT (alpha = 0) and Unlikelihood (alpha > 0) as one vmapped program."""
    c = ctx.config
    if (points := _done(ctx, "unlikelihood")) is not None:
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
    points = _rows_from_metrics(rows, members, ctx.seed)
    fr.write_csv(_points_path(ctx, "unlikelihood"), points)
    return points


def stage_best_of_n(ctx: Context) -> list[dict]:
    """Best-of-N samples of the SFT model ranked by the learned reward model."""
    c = ctx.config
    if (points := _done(ctx, "best_of_n")) is not None:
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
    fr.write_csv(_points_path(ctx, "best_of_n"), points)
    return points


# ---------------------------------------------------------------------------------------------


def make_context(config: FrontierConfig, mesh: Any) -> Context:
    """The task (prepared on first use), the model config (vocabulary rounded as every stage:
    `handover.model_config`) and the evaluation prompts; the first seed's folder and key."""
    task = synthetic.load_task(synthetic.prepare(config.data_dir))
    tok = rdata.task_tokenizer(task)
    cfg = handover.model_config(
        "tiny",
        tok,
        max_len=config.max_prompt_length + config.max_new_tokens,
        d_model=config.d_model,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
    )
    ctx = Context(
        config,
        paths.as_path(config.workdir),
        mesh,
        task,
        tok,
        cfg,
        models.Transformer(cfg),
        models.RewardModel(cfg),
    )
    prompts = task.test_prompts[: config.eval_prompts]
    ctx.eval_batch = rdata.tokenize_prompts(
        tok, prompts, max_prompt_length=config.max_prompt_length
    )
    return ctx.for_seed(config.seeds[0])


# The comparisons the summary states only where the intervals over seeds are disjoint.
COMPARISONS = (
    ("dpo", "ppo"), ("dpo", "ppo-gt"), ("dpo", "grpo"), ("dpo", "rloo"), ("ppo", "grpo"),
    ("ppo", "rloo"), ("grpo", "rloo"), ("dpo", "best-of-n"), ("ppo", "best-of-n"),
)  # fmt: skip


def run_seed(ctx: Context, timed: Any) -> tuple[list[dict], dict, dict | None]:
    """Every stage after the SFT model for `ctx.seed`: (points, reward-model info, DPO timing
    (None unless this seed times the vmapped sweep))."""
    s = f"seed {ctx.seed}"
    points = timed(f"{s} sft", stage_sft, ctx)
    ctx.train_pairs, heldout = timed(f"{s} pairs", stage_pairs, ctx)
    rm_info = timed(f"{s} reward_model", stage_reward_model, ctx, ctx.train_pairs, heldout)
    print(
        f"seed {ctx.seed} reward model: held-out accuracy {rm_info['heldout_accuracy']:.3f} on "
        f"{rm_info['heldout_pairs']} pairs ({rm_info['train_pairs']} training pairs)"
    )
    dpo_points, timing = timed(f"{s} dpo", stage_dpo, ctx)
    points += dpo_points
    points += timed(f"{s} ppo", stage_ppo, ctx)
    points += timed(f"{s} ppo_gt", stage_ppo_gt, ctx)
    for algo in ctx.config.critic_free:
        points += timed(f"{s} {algo}", stage_critic_free, ctx, algo)
    points += timed(f"{s} unlikelihood", stage_unlikelihood, ctx)
    points += timed(f"{s} best_of_n", stage_best_of_n, ctx)
    return points, rm_info, timing


def run_frontier(config: FrontierConfig, mesh: Any = None) -> dict:
    """Runs (or resumes) every stage of every seed into `config.workdir`; writes frontier.csv
    (every point), frontier_bands.csv (each method's frontier over seeds with its confidence
    band), frontier.png and summary.json and prints the table; returns the summary."""
    start = time.perf_counter()
    if config.compilation_cache and not jax.config.jax_compilation_cache_dir:
        # Every seed builds the same programs: from the second on they load compiled.
        cache = paths.as_str(paths.as_path(config.workdir) / "jax_cache")  # gs:// works too
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    mesh = sh.make_mesh(**sh.parse_mesh_spec(config.mesh)) if mesh is None else mesh
    base = make_context(config, mesh)
    timings = {}

    def timed(name, fn, *args):
        t, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        timings[name] = {
            "wall_s": round(time.perf_counter() - t, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
        print(
            f"[{name}] done: {timings[name]['wall_s']:.1f} s ({timings[name]['cpu_s']:.1f} s CPU)"
        )
        return out

    timed("sft model", stage_sft_model, base)
    points, rm_infos, timing = [], {}, None
    for seed in config.seeds:
        seed_points, rm_infos[seed], seed_timing = run_seed(base.for_seed(seed), timed)
        points += seed_points
        timing = timing or seed_timing

    root = paths.as_path(config.workdir)
    csv_path = fr.write_csv(root / "frontier.csv", points)
    max_kl = max([float(p["kl"]) for p in points] + [1e-3])
    bands = fr.frontier_bands(points, np.linspace(0.0, max_kl, 200), level=config.confidence)
    bands_path = fr.write_bands_csv(root / "frontier_bands.csv", bands)
    png_path = fr.plot_frontier(points, root / "frontier.png", level=config.confidence)
    ci = fr.frontier_table_ci(points, config.kl_thresholds, level=config.confidence)
    seps = fr.separations(points, config.kl_thresholds, COMPARISONS, level=config.confidence)
    accuracy = [info["heldout_accuracy"] for info in rm_infos.values()]

    def clean(v):
        return None if np.isnan(v) else v

    summary = {
        "csv": str(csv_path),
        "bands_csv": str(bands_path),
        "figure": str(png_path),
        "seeds": list(config.seeds),
        "confidence": config.confidence,
        "reward_model": {str(k): v for k, v in rm_infos.items()},
        "reward_model_accuracy_mean": float(np.mean(accuracy)),
        "vmap_timing": timing,
        "table": {
            "kl_thresholds": list(config.kl_thresholds),
            "best_reward": {m: [clean(v[0]) for v in vs] for m, vs in ci.items()},
            "half_width": {m: [clean(v[1]) for v in vs] for m, vs in ci.items()},
        },
        "separated": [x for x in seps if x["verdict"] != "overlap"],
        "stage_seconds": timings,
        "seconds": round(time.perf_counter() - start, 1),
    }
    paths.write_text_atomic(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    print()
    print(f"frontier figure: {png_path}")
    print(f"frontier points: {csv_path} ({len(points)} rows); bands: {bands_path}")
    print(
        f"reward model held-out accuracy: {np.mean(accuracy):.3f} (mean over "
        f"{len(accuracy)} seeds: {', '.join(f'{a:.3f}' for a in accuracy)})"
    )
    if timing:
        print(
            f"vmapped sweep: {timing['vmapped_s']:.2f} s, one by one: "
            f"{timing['one_by_one_s']:.2f} s, speed-up {timing['speedup']:.2f}x "
            f"({timing['members']} DPO runs x {timing['steps']} steps; max |param diff| "
            f"{timing['max_param_diff']:.1e})"
        )
    n = len(config.seeds)
    print(
        f"best reward (VADER) at KL(π ‖ π_SFT) <= threshold, nats: mean over {n} seed(s)"
        + (f" ± {config.confidence:.0%} t-interval half-width" if n > 1 else "")
    )
    print(fr.format_table(ci, config.kl_thresholds))
    if n > 1:
        print("separated (intervals disjoint):")
        for x in summary["separated"] or [{"verdict": None}]:
            if x["verdict"] is None:
                print("  none")
                continue
            hi, lo = (x["a"], x["b"]) if x["verdict"] == "a > b" else (x["b"], x["a"])
            print(f"  KL<={x['kl']:g}: {hi} above {lo}")
    print(f"total {summary['seconds']:.0f} s")
    return summary
