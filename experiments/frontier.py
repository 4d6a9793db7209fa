"""Reward vs KL frontier of DPO, PPO, PPO-GT, Preferred-FT, Unlikelihood and Best-of-N (DPO paper,
Rafailov et al. 2023, Fig. 2 left), reproduced offline in miniature on the synthetic reviews.

    .venv/bin/python experiments/frontier.py            # `make demo`: ~10 min on 2 CPU cores
    .venv/bin/python experiments/frontier.py --preset tiny --workdir /tmp/frontier_tiny  # ~1.5 min

As the paper does on IMDb: a small GPT-2-shaped SFT model is trained on the reviews; it samples
4 completions per training prefix and all 6 pairs are labelled by the ground-truth reward (VADER);
a Bradley-Terry reward model is trained on those pairs (its held-out accuracy is reported); then
every method starts from the SFT model and is evaluated every few steps on held-out test prompts,
each evaluation a point (KL, reward): sequence-level exact KL(π ‖ π_SFT) of the sampled
completions and mean VADER reward of prompt + completion (`rlhf_jax.eval`).

- DPO over a β sweep: one `jit(vmap(step))` over stacked train states (hparams["beta"]); the
  script times it against the same runs one by one.
- PPO on the learned reward model over KL coefficients (also one vmapped program), and PPO-GT on
  the ground-truth reward (compiled rollout -> host VADER -> compiled score + update).
- Preferred-FT (SFT on the chosen completions) and Unlikelihood (weight α), one vmapped program.
- Best-of-N with the learned reward model, N in (1, 4, 16, 64), KL = log N - (N-1)/N.
- The SFT policy itself (KL = 0).

Writes into --workdir (default runs/frontier): frontier.csv (method, hyperparameter, seed, step,
kl, reward, stderr), frontier.png, summary.json, and one folder per stage (sft/, reward_model/,
pairs/, dpo/, ppo/, ppo_gt/, unlikelihood/, best_of_n/) with its checkpoints, metrics.jsonl and
points.csv. Rerunning the same command resumes: finished stages are read back, an interrupted one
continues from its last checkpoint, and frontier.csv is rebuilt from the stages' points (no row
twice).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import data as rdata
from rlhf_jax import eval as ev
from rlhf_jax import frontier as fr
from rlhf_jax import models, pairs, runner, sharding, train
from rlhf_jax.data import synthetic
from rlhf_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Config:
    """The frontier experiment (all sizes chosen for a 2-core CPU by default)."""

    workdir: str = "runs/frontier"
    data_dir: str = runner.default_data_dir(__file__)  # prepared synthetic task (cached)
    seed: int = 0
    mesh: str = "data=-1"  # data=D,fsdp=F,tensor=T (-1: the remaining devices)
    progress: bool = True  # tqdm bars
    # The policy: a GPT-2-shaped decoder (vocabulary = the task tokenizer's).
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_prompt_length: int = 8  # prompts are 2-8 token prefixes
    max_new_tokens: int = 24  # completion cap; sequences are prompt + completion <= 32 tokens
    temperature: float = 1.0  # sampling temperature everywhere (pairs, PPO, evaluation)
    # SFT on the training reviews.
    sft_steps: int = 400
    sft_batch_size: int = 64
    sft_lr: float = 2e-3
    # Preference pairs and the reward model.
    pair_prompts: int = 2048  # training prefixes, completions_per_prompt samples each
    heldout_prompts: int = 256  # test prefixes whose pairs measure the RM's accuracy
    completions_per_prompt: int = 4
    rm_steps: int = 250
    rm_batch_size: int = 32
    rm_lr: float = 5e-4
    # Evaluation.
    eval_prompts: int = 256  # held-out test prompts of every (KL, reward) point
    checkpoint_every: int = 100  # steps between checkpoints inside a stage (resume)
    # DPO.
    dpo_betas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    dpo_steps: int = 200
    dpo_batch_size: int = 32
    dpo_lr: float = 3e-4
    dpo_eval_every: int = 25
    timing_steps: int = 3  # steps timed for the vmapped-vs-one-by-one comparison
    # PPO (learned reward model; rewards normalised to mean 0, std 1 on SFT samples) and PPO-GT.
    ppo_kl_coefs: tuple[float, ...] = (0.05, 0.2, 0.5)
    ppo_gt_kl_coef: float = 0.05
    ppo_steps: int = 40
    ppo_batch_size: int = 64
    ppo_lr: float = 3e-4
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    ppo_eval_every: int = 5
    # Preferred-FT (alpha = 0) and Unlikelihood.
    unlikelihood_alphas: tuple[float, ...] = (0.5,)
    ft_steps: int = 90
    ft_batch_size: int = 32
    ft_lr: float = 3e-4
    ft_eval_every: int = 30
    # Best-of-N with the learned reward model.
    bon_ns: tuple[int, ...] = (1, 4, 16, 64)
    bon_prompts: int = 128
    # The summary table: best reward at KL <= each threshold (nats).
    kl_thresholds: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)


PRESETS = {
    "default": Config(),
    "tiny": Config(
        workdir="runs/frontier_tiny",
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_new_tokens=12,
        sft_steps=60,
        sft_batch_size=32,
        sft_lr=3e-3,
        pair_prompts=64,
        heldout_prompts=32,
        rm_steps=20,
        rm_batch_size=16,
        eval_prompts=32,
        checkpoint_every=1000,
        dpo_betas=(0.1, 1.0),
        dpo_steps=10,
        dpo_batch_size=16,
        dpo_eval_every=5,
        timing_steps=2,
        ppo_kl_coefs=(0.05, 0.2),
        ppo_steps=4,
        ppo_batch_size=16,
        ppo_eval_every=2,
        ppo_minibatches=1,
        ft_steps=6,
        ft_batch_size=16,
        ft_eval_every=3,
        bon_ns=(1, 4),
        bon_prompts=16,
        kl_thresholds=(0.5, 1.0, 2.0),
    ),
}


@dataclasses.dataclass
class Context:
    """What every stage reads: the task, the models and the fixed evaluation prompts."""

    config: Config
    root: Path
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

    def evaluate(self, params: Any, *, texts: bool = False) -> tuple[float, float, float, list]:
        """(KL, reward, reward stderr, sample texts) of a policy on the evaluation prompts; the
        same sampling key for every policy (common random numbers)."""
        c = self.config
        res = ev.evaluate_reward_kl(
            self.model,
            params,
            self.sft_params,
            self.eval_batch,
            self.eval_rng,
            sampling=SamplingConfig(c.max_new_tokens, c.temperature),
            eos_id=self.tok.eos_id,
            pad_id=self.tok.pad_id,
            reward_fn=synthetic.ground_truth_reward,
            tokenizer=self.tok,
            batch_size=c.eval_prompts,
        )
        return res.kl_mean, res.reward_mean, res.reward_stderr, (res.texts[:4] if texts else [])

    def fit(self, name: str, step: Any, state: Any, batches: Any, **kwargs) -> tuple[Any, list]:
        c = self.config
        kwargs.setdefault("checkpoint_every", c.checkpoint_every)
        kwargs.setdefault("log_every", kwargs.get("eval_every") or 50)
        return runner.fit(
            step,
            state,
            batches,
            workdir=self.root / name,
            mesh=self.mesh,
            desc=name,
            progress=c.progress,
            **kwargs,
        )


def _points_path(ctx: Context, stage: str) -> Path:
    return ctx.root / stage / "points.csv"


def _done(ctx: Context, stage: str) -> list[dict] | None:
    path = _points_path(ctx, stage)
    return fr.read_csv(path) if path.is_file() else None


def _sweep_eval(ctx: Context, n: int, params_of) -> Any:
    """`eval_fn(state, step)` for `runner.fit`: one (KL, reward) point per sweep member."""

    def eval_fn(state, step):
        out = {}
        for i in range(n):
            kl, reward, stderr, _ = ctx.evaluate(params_of(fr.sweep_member(state, i)))
            out.update({f"kl/{i}": kl, f"reward/{i}": reward, f"stderr/{i}": stderr})
        return out

    return eval_fn


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


def _preference_loader(ctx: Context, records: list, batch_size: int, seed: int) -> Any:
    c = ctx.config
    return runner.task_loaders(
        None,
        "preference",
        batch_size=batch_size,
        max_length=c.max_prompt_length + c.max_new_tokens,
        max_prompt_length=c.max_prompt_length,
        seed=seed,
        records=records,
        tokenizer=ctx.tok,
    )


def _collate_all(ctx: Context, records: list) -> dict[str, np.ndarray]:
    c = ctx.config
    return rdata.collate_preferences(
        records,
        ctx.tok,
        max_length=c.max_prompt_length + c.max_new_tokens,
        max_prompt_length=c.max_prompt_length,
        buckets=None,
    )


def _chunks(arrays: dict[str, np.ndarray], size: int):
    """Fixed-size chunks (the last one padded by repeating row 0) with an "index" key."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, size):
        idx = np.arange(start, start + size)
        idx = np.where(idx < n, idx, 0)
        yield {"index": idx, **{k: v[idx] for k, v in arrays.items()}}


# ---------------------------------------------------------------------------------------------
# Stages.


def stage_sft(ctx: Context) -> list[dict]:
    """Trains (or reloads) the SFT model and evaluates it: the KL = 0 point."""
    c, wd = ctx.config, ctx.root / "sft"
    if not (wd / runner.HF_DIR).is_dir():
        params = models.init_params(ctx.cfg, jax.random.PRNGKey(c.seed))
        opt = train.make_optimizer(
            c.sft_lr, warmup_steps=c.sft_steps // 10, total_steps=c.sft_steps, weight_decay=0.01
        )
        length = c.max_prompt_length + c.max_new_tokens
        loader = runner.task_loaders(
            ctx.task,
            "demonstration",
            batch_size=c.sft_batch_size,
            max_length=length,
            max_prompt_length=length - 1,
            seed=c.seed,
        )
        state, rows = ctx.fit(
            "sft",
            train.make_sft_step(ctx.model, opt),
            train.create_train_state(params, opt, c.seed),
            loader,
            steps=c.sft_steps,
            log_every=max(c.sft_steps // 10, 1),
        )
        print(f"sft: step {rows[-1]['step']}, token NLL {rows[-1]['nll_token']:.3f}")
        runner.save_lm(wd, ctx.cfg, state.params, tokenizer=ctx.tok)
    _, ctx.sft_params = runner.load_init_params(wd)
    if (points := _done(ctx, "sft")) is not None:
        return points
    kl, reward, stderr, texts = ctx.evaluate(ctx.sft_params, texts=True)
    (wd / "samples.txt").write_text("\n".join(texts) + "\n")
    print("sft samples:\n  " + "\n  ".join(texts[:3]))
    points = [fr.make_row("sft", "", c.seed, 0, kl, reward, stderr)]
    fr.write_csv(_points_path(ctx, "sft"), points)
    return points


def stage_pairs(ctx: Context) -> tuple[list, list]:
    """4 completions per prefix from the SFT model, all pairs labelled by VADER (cached)."""
    c = ctx.config
    common = dict(
        completions_per_prompt=c.completions_per_prompt,
        sampling=SamplingConfig(c.max_new_tokens, c.temperature),
        reward_fn=synthetic.ground_truth_reward,
        max_prompt_length=c.max_prompt_length,
        batch_size=512,
    )
    rng = jax.random.PRNGKey(c.seed + 1)
    train_pairs = pairs.make_preference_pairs(
        ctx.model,
        ctx.sft_params,
        ctx.task.train_prompts[: c.pair_prompts],
        ctx.tok,
        jax.random.fold_in(rng, 0),
        cache_path=ctx.root / "pairs" / "train.jsonl",
        **common,
    )
    start = c.eval_prompts  # held-out prefixes disjoint from the evaluation prompts
    heldout = pairs.make_preference_pairs(
        ctx.model,
        ctx.sft_params,
        ctx.task.test_prompts[start : start + c.heldout_prompts],
        ctx.tok,
        jax.random.fold_in(rng, 1),
        cache_path=ctx.root / "pairs" / "heldout.jsonl",
        **common,
    )
    return train_pairs, heldout


def stage_reward_model(ctx: Context, train_pairs: list, heldout: list) -> dict:
    """Bradley-Terry reward model from the SFT model; held-out accuracy; scores normalised to
    mean 0 and std 1 on the held-out SFT samples (the PPO reward scale)."""
    c, wd = ctx.config, ctx.root / "reward_model"
    info_path = wd / "eval.json"
    if not info_path.is_file():
        rm = models.RewardModel(ctx.cfg)
        params = models.init_reward_params(
            ctx.cfg, jax.random.PRNGKey(c.seed + 2), lm_params=ctx.sft_params
        )
        opt = train.make_optimizer(
            c.rm_lr, warmup_steps=c.rm_steps // 10, total_steps=c.rm_steps, weight_decay=0.01
        )
        state, rows = ctx.fit(
            "reward_model",
            train.make_reward_step(rm, opt),
            train.create_train_state(params, opt, c.seed),
            _preference_loader(ctx, train_pairs, c.rm_batch_size, c.seed),
            steps=c.rm_steps,
            log_every=max(c.rm_steps // 10, 1),
        )
        params = jax.device_get(state.params)
        apply = jax.jit(lambda p, t, m: rm.apply({"params": p}, t, m))
        arrays = _collate_all(ctx, heldout)
        chosen, rejected = [], []
        for chunk in _chunks(arrays, 512):
            chosen.append(apply(params, chunk["chosen_tokens"], chunk["chosen_attention_mask"]))
            rejected.append(
                apply(params, chunk["rejected_tokens"], chunk["rejected_attention_mask"])
            )
        n = len(heldout)
        chosen = np.concatenate(jax.device_get(chosen))[:n]
        rejected = np.concatenate(jax.device_get(rejected))[:n]
        scores = np.concatenate([chosen, rejected])
        mean, std = float(scores.mean()), float(scores.std() + 1e-6)
        head = params["head"]
        params["head"] = {"kernel": head["kernel"] / std, "bias": (head["bias"] - mean) / std}
        info = {
            "heldout_accuracy": float(np.mean(chosen > rejected)),
            "heldout_pairs": n,
            "train_pairs": len(train_pairs),
            "train_accuracy_last_log": float(rows[-1]["accuracy"]),
            "score_mean_before_normalisation": mean,
            "score_std_before_normalisation": std,
        }
        runner.save_reward_model(wd, ctx.cfg, params, tokenizer=ctx.tok)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    _, ctx.rm_params = runner.load_reward_model(wd)
    return json.loads(info_path.read_text())


def _reference_records(ctx: Context) -> list[dict]:
    """Training pairs as dicts with the SFT model's sequence log-probs (computed once)."""
    arrays = _collate_all(ctx, ctx.train_pairs)
    chosen, rejected = train.compute_reference_logps(
        ctx.model, ctx.sft_params, _chunks(arrays, 256)
    )
    records = [rdata.record_to_dict(r) for r in ctx.train_pairs]
    return train.attach_reference_to_records(records, chosen, rejected)


def stage_dpo(ctx: Context) -> tuple[list[dict], dict]:
    """DPO over the β sweep as one vmapped program, evaluated every dpo_eval_every steps."""
    c, wd = ctx.config, ctx.root / "dpo"
    timing_path = wd / "timing.json"
    if (points := _done(ctx, "dpo")) is not None:
        return points, json.loads(timing_path.read_text())
    records = _reference_records(ctx)
    opt = train.make_optimizer(c.dpo_lr, warmup_steps=c.dpo_steps // 10)
    step = train.make_dpo_step(ctx.model, opt)
    states = fr.stack_sweep(
        [
            train.create_train_state(ctx.sft_params, opt, c.seed, hparams={"beta": b})
            for b in c.dpo_betas
        ]
    )
    n, mesh = len(c.dpo_betas), ctx.mesh
    loader = _preference_loader(ctx, records, c.dpo_batch_size, c.seed)
    example = _collate_all(ctx, records[: c.dpo_batch_size])  # the batch shapes
    sweep = sharding.compile_step(fr.sweep_step(step), mesh, states, example)  # for training
    if not timing_path.is_file():
        timing_loader = _preference_loader(ctx, records, c.dpo_batch_size, c.seed + 100)
        batches = [next(timing_loader) for _ in range(c.timing_steps + 1)]
        batches = [sharding.shard_batch(b, mesh) for b in batches]
        one = sharding.compile_step(step, mesh, fr.sweep_member(states, 0), example)
        place = lambda s: sharding.shard_state(s, mesh)
        timing = fr.time_sweep(sweep, one, states, batches, place=place)
        wd.mkdir(parents=True, exist_ok=True)
        timing_path.write_text(json.dumps(timing, indent=2) + "\n")
    timing = json.loads(timing_path.read_text())
    _, rows = ctx.fit(
        "dpo",
        sweep,
        states,
        loader,
        steps=c.dpo_steps,
        eval_fn=_sweep_eval(ctx, n, lambda s: s.params),
        eval_every=c.dpo_eval_every,
        jit=False,  # `sweep` is compiled already
    )
    members = [("dpo", f"beta={b:g}") for b in c.dpo_betas]
    points = _rows_from_metrics(rows, members, c.seed)
    fr.write_csv(_points_path(ctx, "dpo"), points)
    return points, timing


def _ppo_parts(ctx: Context, kl_coef: float, reward_fn: Any):
    c = ctx.config
    ppo_cfg = train.PPOConfig(
        kl_coef=kl_coef,
        ppo_epochs=c.ppo_epochs,
        num_minibatches=c.ppo_minibatches,
        temperature=c.temperature,
        max_new_tokens=c.max_new_tokens,
        eos_id=ctx.tok.eos_id,
        pad_id=ctx.tok.pad_id,
    )
    popt = train.make_optimizer(c.ppo_lr, warmup_steps=max(c.ppo_steps // 10, 1))
    vopt = train.make_optimizer(c.ppo_lr, warmup_steps=max(c.ppo_steps // 10, 1))
    fns = train.make_ppo(
        ctx.model, models.ValueModel(ctx.cfg), popt, vopt, ppo_cfg, reward_fn=reward_fn
    )

    def make_state(coef: float) -> Any:
        value = models.init_value_params(ctx.cfg, jax.random.PRNGKey(c.seed), ctx.sft_params)
        return train.create_ppo_state(
            dataclasses.replace(ppo_cfg, kl_coef=coef),
            policy_params=ctx.sft_params,
            value_params=value,
            ref_params=ctx.sft_params,
            policy_optimizer=popt,
            value_optimizer=vopt,
            rng=c.seed,
            reward_params=None if reward_fn is None else ctx.rm_params,
        )

    return fns, make_state


def _prompt_loader(ctx: Context, batch_size: int) -> Any:
    c = ctx.config
    return runner.task_loaders(
        ctx.task,
        "prompt",
        batch_size=batch_size,
        max_length=c.max_prompt_length + c.max_new_tokens,
        max_prompt_length=c.max_prompt_length,
        seed=c.seed,
    )


def stage_ppo(ctx: Context) -> list[dict]:
    """PPO on the learned reward model, the KL-coefficient sweep as one vmapped program."""
    c = ctx.config
    if (points := _done(ctx, "ppo")) is not None:
        return points
    fns, make_state = _ppo_parts(ctx, c.ppo_kl_coefs[0], train.reward_model_fn(ctx.rm_model))
    states = fr.stack_sweep([make_state(k) for k in c.ppo_kl_coefs])
    _, rows = ctx.fit(
        "ppo",
        fr.sweep_step(fns.step),
        states,
        _prompt_loader(ctx, c.ppo_batch_size),
        steps=c.ppo_steps,
        eval_fn=_sweep_eval(ctx, len(c.ppo_kl_coefs), lambda s: s.policy_params),
        eval_every=c.ppo_eval_every,
    )
    members = [("ppo", f"kl_coef={k:g}") for k in c.ppo_kl_coefs]
    points = _rows_from_metrics(rows, members, c.seed)
    fr.write_csv(_points_path(ctx, "ppo"), points)
    return points


def stage_ppo_gt(ctx: Context) -> list[dict]:
    """PPO on the ground-truth reward: compiled rollout -> host VADER -> compiled update."""
    c = ctx.config
    if (points := _done(ctx, "ppo_gt")) is not None:
        return points
    fns, make_state = _ppo_parts(ctx, c.ppo_gt_kl_coef, None)
    step = runner.make_text_reward_ppo_step(fns, synthetic.ground_truth_reward, ctx.tok, ctx.mesh)
    _, rows = ctx.fit(
        "ppo_gt",
        step,
        make_state(c.ppo_gt_kl_coef),
        _prompt_loader(ctx, c.ppo_batch_size),
        steps=c.ppo_steps,
        eval_fn=lambda s, t: dict(
            zip(("kl/0", "reward/0", "stderr/0"), ctx.evaluate(s.policy_params)[:3])
        ),
        eval_every=c.ppo_eval_every,
        jit=False,
    )
    points = _rows_from_metrics(rows, [("ppo-gt", f"kl_coef={c.ppo_gt_kl_coef:g}")], c.seed)
    fr.write_csv(_points_path(ctx, "ppo_gt"), points)
    return points


def stage_unlikelihood(ctx: Context) -> list[dict]:
    """Preferred-FT (alpha = 0) and Unlikelihood (alpha > 0) as one vmapped program."""
    c = ctx.config
    if (points := _done(ctx, "unlikelihood")) is not None:
        return points
    alphas = (0.0, *c.unlikelihood_alphas)
    opt = train.make_optimizer(c.ft_lr, warmup_steps=c.ft_steps // 10)
    states = fr.stack_sweep(
        [
            train.create_train_state(ctx.sft_params, opt, c.seed, hparams={"alpha": a})
            for a in alphas
        ]
    )
    _, rows = ctx.fit(
        "unlikelihood",
        fr.sweep_step(fr.make_unlikelihood_step(ctx.model, opt)),
        states,
        _preference_loader(ctx, ctx.train_pairs, c.ft_batch_size, c.seed),
        steps=c.ft_steps,
        eval_fn=_sweep_eval(ctx, len(alphas), lambda s: s.params),
        eval_every=c.ft_eval_every,
    )
    members = [("preferred-ft", "chosen-nll")]
    members += [("unlikelihood", f"alpha={a:g}") for a in c.unlikelihood_alphas]
    points = _rows_from_metrics(rows, members, c.seed)
    fr.write_csv(_points_path(ctx, "unlikelihood"), points)
    return points


def stage_best_of_n(ctx: Context) -> list[dict]:
    """Best-of-N samples of the SFT model ranked by the learned reward model."""
    c = ctx.config
    if (points := _done(ctx, "best_of_n")) is not None:
        return points
    batch = {k: v[: c.bon_prompts] for k, v in ctx.eval_batch.items()}
    rm_score = ev.reward_model_score_fn(ctx.rm_model, ctx.rm_params)

    def score_fn(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The reward model on chunks of bon_prompts rows: one compiled shape for every N."""
        arrays = {"tokens": tokens, "mask": mask}
        scores = [rm_score(ch["tokens"], ch["mask"]) for ch in _chunks(arrays, c.bon_prompts)]
        return np.concatenate(scores)[: len(tokens)]

    points = []
    for n in c.bon_ns:
        res = ev.best_of_n(
            ctx.model,
            ctx.sft_params,
            batch,
            jax.random.fold_in(ctx.eval_rng, n),
            n=n,
            sampling=SamplingConfig(c.max_new_tokens, c.temperature),
            score_fn=score_fn,
            reward_fn=synthetic.ground_truth_reward,
            tokenizer=ctx.tok,
            eos_id=ctx.tok.eos_id,
            pad_id=ctx.tok.pad_id,
            batch_size=c.bon_prompts,  # one compiled shape for every N
        )
        points.append(
            fr.make_row(
                "best-of-n", f"n={n}", c.seed, 0, res.kl, res.reward_mean, res.reward_stderr
            )
        )
    fr.write_csv(_points_path(ctx, "best_of_n"), points)
    return points


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the command line `argv`; returns the summary (also written to summary.json)."""
    config = runner.parse_config(Config, PRESETS, argv, description=__doc__)
    start = time.perf_counter()
    sharding.init_distributed()
    mesh = runner.resolve_mesh(config.mesh)
    batch_names = ("sft_batch_size", "rm_batch_size", "dpo_batch_size", "ppo_batch_size")
    for name in (*batch_names, "ft_batch_size"):
        runner.check_batch(getattr(config, name), mesh, name=name)
    root = Path(config.workdir)
    runner.write_run_config(root, config)
    task = synthetic.load_task(synthetic.prepare(config.data_dir))
    tok = runner.task_tokenizer(task)
    cfg = models.get_config(
        "tiny",
        vocab_size=tok.vocab_size,
        max_len=config.max_prompt_length + config.max_new_tokens,
        d_model=config.d_model,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
    )
    ctx = Context(
        config, root, mesh, task, tok, cfg, models.Transformer(cfg), models.RewardModel(cfg)
    )
    prompts = task.test_prompts[: config.eval_prompts]
    ctx.eval_batch = rdata.tokenize_prompts(
        tok, prompts, max_prompt_length=config.max_prompt_length
    )
    ctx.eval_rng = jax.random.PRNGKey(config.seed + 12345)

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

    points = timed("sft", stage_sft, ctx)
    ctx.train_pairs, heldout = timed("pairs", stage_pairs, ctx)
    rm_info = timed("reward_model", stage_reward_model, ctx, ctx.train_pairs, heldout)
    print(
        f"reward model: held-out accuracy {rm_info['heldout_accuracy']:.3f} on "
        f"{rm_info['heldout_pairs']} pairs ({rm_info['train_pairs']} training pairs)"
    )
    dpo_points, timing = timed("dpo", stage_dpo, ctx)
    points += dpo_points
    points += timed("ppo", stage_ppo, ctx)
    points += timed("ppo_gt", stage_ppo_gt, ctx)
    points += timed("unlikelihood", stage_unlikelihood, ctx)
    points += timed("best_of_n", stage_best_of_n, ctx)

    csv_path = fr.write_csv(root / "frontier.csv", points)
    png_path = fr.plot_frontier(points, root / "frontier.png")
    table = fr.frontier_table(points, config.kl_thresholds)
    summary = {
        "csv": str(csv_path),
        "figure": str(png_path),
        "reward_model": rm_info,
        "vmap_timing": timing,
        "table": {
            "kl_thresholds": list(config.kl_thresholds),
            "best_reward": {m: [None if np.isnan(v) else v for v in vs] for m, vs in table.items()},
        },
        "stage_seconds": timings,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(f"frontier figure: {png_path}")
    print(f"frontier points: {csv_path} ({len(points)} rows)")
    print(f"reward model held-out accuracy: {rm_info['heldout_accuracy']:.3f}")
    print(
        f"vmapped sweep: {timing['vmapped_s']:.2f} s, one by one: {timing['one_by_one_s']:.2f} s, "
        f"speed-up {timing['speedup']:.2f}x ({timing['members']} DPO runs x {timing['steps']} "
        f"steps; max |param diff| {timing['max_param_diff']:.1e})"
    )
    print("best reward (VADER) at KL(π ‖ π_SFT) <= threshold, nats:")
    print(fr.format_table(table, config.kl_thresholds))
    print(f"total {summary['seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    runner.run_cli(main)
