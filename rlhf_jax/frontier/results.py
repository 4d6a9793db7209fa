"""The frontier's results: one CSV row per evaluated point, the best-reward table, the figure.

Every evaluated point is one CSV row with the columns `COLUMNS`:

    method, hyperparameter, seed, step, kl, reward, stderr
    dpo,    beta=0.1,       0,    50,   3.21, 0.612, 0.031

`method` is one of `METHODS`; `hyperparameter` names the swept value ("beta=0.1", "kl_coef=0.05",
"alpha=0.5", "n=16", plus the loss variant if any); `kl` is the sequence-level KL(π ‖ π_ref) in
nats, `reward` the mean ground-truth reward over held-out prompts and `stderr` its standard error.

    rows = read_csv(path)
    table = frontier_table(rows, thresholds=(1, 2, 5, 10))   # method -> best reward at KL <= t
    print(format_table(table, (1, 2, 5, 10)))
    plot_frontier(rows, "frontier.png")
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, SupportsFloat, SupportsInt

import jax
import numpy as np

COLUMNS = ("method", "hyperparameter", "seed", "step", "kl", "reward", "stderr")
METHODS = ("sft", "dpo", "ppo", "ppo-gt", "preferred-ft", "unlikelihood", "best-of-n")
# Labels and styles of the figure, after the paper's legend.
_STYLE = {
    "dpo": ("DPO", "tab:red", "o"),
    "ppo": ("PPO", "tab:blue", "s"),
    "ppo-gt": ("PPO-GT", "tab:cyan", "^"),
    "preferred-ft": ("Preferred-FT", "tab:green", "D"),
    "unlikelihood": ("Unlikelihood", "tab:orange", "v"),
    "best-of-n": ("Best of N (learned RM)", "tab:purple", "P"),
    "sft": ("SFT", "black", "*"),
}

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------
# CSV.


def make_row(
    method: str,
    hyperparameter: str,
    seed: SupportsInt,
    step: SupportsInt,
    kl: SupportsFloat,
    reward: SupportsFloat,
    stderr: SupportsFloat,
) -> dict[str, Any]:
    """One frontier point as a dict with exactly the keys `COLUMNS` (Python int/float values)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    return {
        "method": method,
        "hyperparameter": str(hyperparameter),
        "seed": int(seed),
        "step": int(step),
        "kl": float(kl),
        "reward": float(reward),
        "stderr": float(stderr),
    }


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Writes `rows` (keys `COLUMNS`) to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})
    os.replace(tmp, path)
    return path


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a frontier CSV into typed rows (seed/step int, kl/reward/stderr float)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {list(COLUMNS)}")
        return [
            make_row(
                r["method"],
                r["hyperparameter"],
                int(r["seed"]),
                int(r["step"]),
                float(r["kl"]),
                float(r["reward"]),
                float(r["stderr"]),
            )
            for r in reader
        ]


# ---------------------------------------------------------------------------------------------
# Table.


def frontier_table(
    rows: Iterable[Mapping[str, Any]], thresholds: Sequence[float]
) -> dict[str, list[float]]:
    """Best reward of each method among its points with KL <= each threshold.

    `table[m][j] = max{reward(p) : p a point of method m, kl(p) <= thresholds[j]}`, NaN when the
    method has no point under that threshold. Methods appear in `METHODS` order (those present).

    Args:
      rows: frontier points (keys `COLUMNS`).
      thresholds: KL thresholds in nats.
    Returns:
      method -> [len(thresholds)] best rewards.
    """
    rows = list(rows)
    table = {}
    for method in METHODS:
        points = [(float(r["kl"]), float(r["reward"])) for r in rows if r["method"] == method]
        if not points:
            continue
        table[method] = [
            max((rew for kl, rew in points if kl <= t), default=math.nan) for t in thresholds
        ]
    return table


def format_table(table: Mapping[str, Sequence[float]], thresholds: Sequence[float]) -> str:
    """The table of `frontier_table` as fixed-width text ("—" where a method has no point)."""
    head = f"{'method':<14}" + "".join(f"{f'KL<={t:g}':>10}" for t in thresholds)
    lines = [head, "-" * len(head)]
    for method, values in table.items():
        cells = "".join(f"{'—':>10}" if math.isnan(v) else f"{v:>10.3f}" for v in values)
        lines.append(f"{method:<14}" + cells)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figure.


def plot_frontier(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "Synthetic reviews (offline IMDb stand-in): reward vs KL",
    reward_label: str = "reward (VADER, held-out prompts)",
    envelope: bool = True,
) -> Path:
    """Scatter of reward against KL(π ‖ π_ref), one colour and marker per method (paper Fig. 2
    left): every evaluation of every run is a point; Best-of-N is a line over N; SFT is a star.

    Args:
      rows: frontier points (keys `COLUMNS`).
      path: the PNG to write.
      title, reward_label: figure texts.
      envelope: also draw each method's frontier, the running maximum of its rewards along
        increasing KL (a thin line in its colour).
    Returns:
      The path written.
    """
    from matplotlib.figure import Figure  # no pyplot: any backend (or none) will do

    rows = list(rows)
    fig = Figure(figsize=(8.4, 4.8))
    ax = fig.subplots()
    for method in METHODS:
        points = sorted((float(r["kl"]), float(r["reward"])) for r in rows if r["method"] == method)
        if not points:
            continue
        label, color, marker = _STYLE[method]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if method == "best-of-n":
            ax.plot(xs, ys, color=color, marker=marker, ms=7, lw=1.2, label=label, zorder=3)
        elif method == "sft":
            ax.scatter(xs, ys, c=color, marker=marker, s=160, label=label, zorder=4)
        else:
            ax.scatter(
                xs, ys, c=color, marker=marker, s=22, alpha=0.75, label=label, edgecolors="none"
            )
            if envelope:  # the method's frontier: best reward so far along increasing KL
                ax.step(xs, np.maximum.accumulate(ys), where="post", color=color, lw=0.9, alpha=0.6)
    ax.set_xlabel("KL(π ‖ π_ref)  [nats per completion]")
    ax.set_ylabel(reward_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path
