"""The reward-vs-KL frontier experiment (DPO paper, Rafailov et al. 2023, Fig. 2 left) as a
library function, `run_frontier(config)`: `experiments/frontier.py` (`make demo`) is its command
line, and a notebook calls it directly.

Stages (`frontier.stages`, reading a `frontier.context.Context`), each resumable and each a point
source for `frontier.csv`: the SFT model (`stages.train_sft`), preference pairs of its samples
labelled by the ground truth (`pairs.task_preference_pairs`), a Bradley-Terry reward model
(`stages.train_reward_model`, scores normalised to mean 0 / std 1 on held-out pairs), DPO over a
beta sweep as one vmapped program (`stages.train_dpo`), PPO on the reward model over KL
coefficients (one vmapped program) and PPO-GT on the ground truth on the host (`stages.train_ppo`),
GRPO and RLOO on the reward model (each a KL-coefficient sweep as one vmapped program,
`stages.train_critic_free`), Preferred-FT and Unlikelihood (one vmapped program), Best-of-N with
the reward model, and the SFT policy itself. Every point is (exact sequence KL(π ‖ π_SFT), mean
ground- truth reward) on the same held-out prompts with the same sampling key within a seed
(`eval.evaluate_reward_kl`).

Seeds (`config.seeds`): one SFT model (`WORKDIR/sft/`, the reference every KL is measured
against, trained with the first seed), then per seed `WORKDIR/seed_<s>/` with its own preference
pairs, reward model, runs of every method and evaluation key. The bands over seeds therefore
measure what varies between replications of everything after the SFT model. WORKDIR may be a
cloud URL (gs://..., `rlhf_jax.paths`); the synthetic task's --data-dir stays local.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np

from rlhf_jax import paths
from rlhf_jax import sharding as sh
from rlhf_jax.frontier import results as fr
from rlhf_jax.frontier.config import FrontierConfig
from rlhf_jax.frontier.context import Context, make_context
from rlhf_jax.frontier.stages import (
    stage_best_of_n,
    stage_critic_free,
    stage_dpo,
    stage_pairs,
    stage_ppo,
    stage_ppo_gt,
    stage_reward_model,
    stage_sft,
    stage_sft_model,
    stage_unlikelihood,
)

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
