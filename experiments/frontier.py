"""Reward vs KL frontier of DPO, PPO, PPO-GT, GRPO, RLOO, Preferred-FT, Unlikelihood and Best-of-N
(DPO paper, Rafailov et al. 2023, Fig. 2 left), reproduced offline in miniature on the synthetic
reviews, over 3 seeds with 95 % confidence bands.

    .venv/bin/python experiments/frontier.py            # `make demo`: ~14 min on 2 CPU cores
    .venv/bin/python experiments/frontier.py --preset tiny --workdir /tmp/frontier_tiny  # ~2 min
    .venv/bin/python experiments/frontier.py --seeds 0 --workdir runs/frontier_1seed   # ~5 min

As the paper does on IMDb: a small GPT-2-shaped SFT model is trained on the reviews (once: every
KL is measured against it). Then, for each of --seeds: it samples 4 completions per training
prefix and all 6 pairs are labelled by the ground-truth reward (VADER); a Bradley-Terry reward
model is trained on those pairs (its held-out accuracy is reported); then every method starts from
the SFT model and is evaluated every few steps on held-out test prompts, each evaluation a point
(KL, reward): sequence-level exact KL(π ‖ π_SFT) of the sampled completions and mean VADER reward
of prompt + completion (`rlhf_jax.eval`).

- DPO over a β sweep: one `jit(vmap(step))` over stacked train states (hparams["beta"]); the
  first seed times it against the same runs one by one.
- PPO on the learned reward model over KL coefficients (also one vmapped program), and PPO-GT on
  the ground-truth reward (compiled rollout -> host VADER -> compiled score + update).
- GRPO (β k3 in the loss) and RLOO (β k1 in the reward, Eq. 3) on the learned reward model, G
  completions per prompt, each over KL coefficients as one vmapped program.
- Preferred-FT (SFT on the chosen completions) and Unlikelihood (weight α), one vmapped program.
- Best-of-N with the learned reward model, N in (1, 4, 16, 64), KL = log N - (N-1)/N.
- The SFT policy itself (KL = 0).

A method's frontier at KL budget x is, per seed, its best reward among the points with KL <= x;
the table and the bands give the mean over seeds and a Student-t interval (--confidence 0.95),
and the summary lists the comparisons whose intervals are disjoint (`frontier.results`).

The experiment is the library function `rlhf_jax.frontier.pipeline.run_frontier` (its config:
`rlhf_jax.frontier.config.FrontierConfig`); this script is its command line.

Writes into --workdir (default runs/frontier): frontier.csv (method, hyperparameter, seed, step,
kl, reward, stderr), frontier_bands.csv (method, kl, seeds, mean, lo, hi), frontier.png,
summary.json, sft/ (the SFT model) and one folder per seed (seed_0/, ...) with one folder per
stage (sft/, pairs/, reward_model/, dpo/, ppo/, ppo_gt/, grpo/, rloo/, unlikelihood/,
best_of_n/): its checkpoints, metrics.jsonl and points.csv. Rerunning the same command resumes:
finished stages are read back, an interrupted one continues from its last checkpoint, and
frontier.csv is rebuilt from the stages' points (no row twice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from rlhf_jax.errors import ConfigError
from rlhf_jax.frontier import config as frontier_config
from rlhf_jax.frontier.pipeline import run_frontier
from rlhf_jax.run import checks, cli


@dataclasses.dataclass(frozen=True)
class Config(frontier_config.FrontierConfig, cli.DistributedFlags):
    """The frontier experiment and the multi-host flags of every driver."""


PRESETS = {
    name: Config(**{f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)})
    for name, preset in frontier_config.PRESETS.items()
}
BATCH_FIELDS = (
    "sft_batch_size", "rm_batch_size", "dpo_batch_size", "ppo_batch_size", "cf_prompts"
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the command line `argv`; returns the summary (also written to summary.json)."""
    config = cli.parse_config(Config, PRESETS, argv, description=__doc__)
    checks.validate(
        config,
        {
            "critic_free": (lambda a: a in ("grpo", "rloo"), "grpo and/or rloo"),
            "seeds": (lambda x: x >= 0, ">= 0"),
            "confidence": (lambda x: 0 < x < 1, "in (0, 1)"),
            "cf_group_size": (lambda g: g >= 2, ">= 2"),
        },
    )
    if len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, config.seeds))}: repeated seed")
    checks.init_distributed(config)
    mesh = checks.resolve_mesh(config.mesh)
    for name in (*BATCH_FIELDS, "ft_batch_size"):
        checks.check_batch(getattr(config, name), mesh, name=name)
    cli.write_run_config(config.workdir, config)
    return run_frontier(config, mesh)


if __name__ == "__main__":
    cli.run_cli(main)
