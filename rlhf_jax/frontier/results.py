"""The frontier's results: one CSV row per evaluated point, the best-reward table and the
confidence bands over seeds, the figure.

Every evaluated point is one CSV row with the columns `COLUMNS`:

    method, hyperparameter, seed, step, kl, reward, stderr
    dpo,    beta=0.1,       0,    50,   3.21, 0.612, 0.031

`method` is one of `METHODS`; `hyperparameter` names the swept value ("beta=0.1", "kl_coef=0.05",
"alpha=0.5", "n=16", plus the loss variant if any); `kl` is the sequence-level KL(π ‖ π_ref) in
nats, `reward` the mean ground-truth reward over held-out prompts and `stderr` its standard error.

    rows = read_csv(path)
    table = frontier_table(rows, thresholds=(1, 2, 5, 10))   # method -> best reward at KL <= t
    ci = frontier_table_ci(rows, (1, 2, 5, 10))               # method -> [(mean, half-width)]
    print(format_table(table, (1, 2, 5, 10)))
    bands = frontier_bands(rows, kl_grid)                     # BAND_COLUMNS rows
    plot_frontier(rows, "frontier.png")

Over seeds, a method's frontier at KL budget x is, per seed, the best reward among that seed's
points with KL <= x (its upper envelope); the table and the bands report the mean over seeds and
a Student-t confidence interval (95 % by default: mean ± t_{0.975, n-1} · sd / sqrt(n)), defined
where every seed of the method has a point under x. The envelope is a maximum over noisy
evaluations, so it is biased upwards by about the evaluation's standard error; every method
gets the same treatment.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsFloat, SupportsInt

import jax
import numpy as np
from etils import epath

from rlhf_jax import paths

COLUMNS = ("method", "hyperparameter", "seed", "step", "kl", "reward", "stderr")
BAND_COLUMNS = ("method", "kl", "seeds", "mean", "lo", "hi")
METHODS = (
    "sft", "dpo", "ppo", "ppo-gt", "grpo", "rloo", "preferred-ft", "unlikelihood", "best-of-n"
)  # fmt: skip
# Labels and styles of the figure, after the paper's legend.
_STYLE = {
    "dpo": ("DPO", "tab:red", "o"),
    "ppo": ("PPO", "tab:blue", "s"),
    "ppo-gt": ("PPO-GT", "tab:cyan", "^"),
    "grpo": ("GRPO (learned RM)", "tab:olive", "X"),
    "rloo": ("RLOO (learned RM)", "tab:brown", "h"),
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


def _write_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns) -> epath.Path:
    """Writes `rows` (keys `columns`) to `path` atomically (`paths.write_text_atomic`)."""
    f = io.StringIO(newline="")
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in columns})
    paths.write_text_atomic(path, f.getvalue())
    return paths.as_path(path)


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> epath.Path:
    """Writes `rows` (keys `COLUMNS`) to `path` atomically (temporary file, then rename)."""
    return _write_rows(path, rows, COLUMNS)


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a frontier CSV into typed rows (seed/step int, kl/reward/stderr float)."""
    with io.StringIO(paths.as_path(path).read_bytes().decode("utf-8"), newline="") as f:
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
# Table and bands over seeds.


def _envelopes(rows: list[Mapping[str, Any]], method: str) -> dict[int, tuple[np.ndarray, ...]]:
    """seed -> (KLs sorted, best reward so far along them) of one method's points."""
    out = {}
    for seed in sorted({int(r["seed"]) for r in rows if r["method"] == method}):
        pts = sorted(
            (float(r["kl"]), float(r["reward"]))
            for r in rows
            if r["method"] == method and int(r["seed"]) == seed
        )
        kl = np.array([p[0] for p in pts])
        out[seed] = (kl, np.maximum.accumulate(np.array([p[1] for p in pts])))
    return out


def _best_at(envelope: tuple[np.ndarray, np.ndarray], x: float) -> float:
    kl, best = envelope
    i = int(np.searchsorted(kl, x, side="right"))
    return float(best[i - 1]) if i else math.nan


def _interval(values: Sequence[float], level: float) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval; NaN with one value)."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


def frontier_table_ci(
    rows: Iterable[Mapping[str, Any]], thresholds: Sequence[float], *, level: float = 0.95
) -> dict[str, list[tuple[float, float]]]:
    """Per method and KL threshold: (mean over seeds of the best reward at KL <= threshold, the
    half-width of its `level` Student-t interval). (NaN, NaN) where some seed of the method has
    no point under the threshold; the half-width is NaN with one seed.

    Args:
      rows: frontier points (keys `COLUMNS`), any number of seeds.
      thresholds: KL thresholds in nats.
      level: confidence level of the interval.
    Returns:
      method -> [len(thresholds)] (mean, half-width), methods in `METHODS` order.
    """
    rows = list(rows)
    table = {}
    for method in METHODS:
        envs = _envelopes(rows, method)
        if not envs:
            continue
        cells = []
        for t in thresholds:
            best = [_best_at(e, t) for e in envs.values()]
            cells.append(
                (math.nan, math.nan) if any(math.isnan(b) for b in best) else _interval(best, level)
            )
        table[method] = cells
    return table


def frontier_table(
    rows: Iterable[Mapping[str, Any]], thresholds: Sequence[float]
) -> dict[str, list[float]]:
    """Best reward of each method among its points with KL <= each threshold, averaged over seeds.

    With one seed, `table[m][j] = max{reward(p) : p a point of method m, kl(p) <= thresholds[j]}`;
    with several, the mean over seeds of that maximum. NaN when (a seed of) the method has no
    point under that threshold. Methods appear in `METHODS` order (those present).

    Args:
      rows: frontier points (keys `COLUMNS`).
      thresholds: KL thresholds in nats.
    Returns:
      method -> [len(thresholds)] best rewards.
    """
    ci = frontier_table_ci(rows, thresholds)
    return {m: [mean for mean, _ in cells] for m, cells in ci.items()}


def frontier_bands(
    rows: Iterable[Mapping[str, Any]], kl_grid: Sequence[float] | np.ndarray, *, level: float = 0.95
) -> list[dict[str, Any]]:
    """Each method's frontier over seeds on a KL grid: rows with the keys `BAND_COLUMNS` (method,
    kl, seeds, mean, lo, hi), at the (ascending) grid points from where every seed of the method
    has a point with KL <= kl up to the method's largest KL (lo = hi = mean with one seed)."""
    rows = list(rows)
    bands = []
    for method in METHODS:
        envs = _envelopes(rows, method)
        if not envs:
            continue
        last = max(float(e[0][-1]) for e in envs.values())
        for x in kl_grid:
            if float(x) > last:
                break
            best = [_best_at(e, float(x)) for e in envs.values()]
            if not best or any(math.isnan(b) for b in best):
                continue
            mean, half = _interval(best, level)
            half = 0.0 if math.isnan(half) else half
            bands.append(
                {"method": method, "kl": float(x), "seeds": len(best), "mean": mean,
                 "lo": mean - half, "hi": mean + half}
            )  # fmt: skip
    return bands


def write_bands_csv(path: str | os.PathLike, bands: Iterable[Mapping[str, Any]]) -> epath.Path:
    """Writes `frontier_bands` rows (keys `BAND_COLUMNS`) atomically."""
    return _write_rows(path, bands, BAND_COLUMNS)


def separations(
    rows: Iterable[Mapping[str, Any]],
    thresholds: Sequence[float],
    pairs: Sequence[tuple[str, str]],
    *,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """Which of two methods is higher at each KL budget, stated only where their intervals are
    disjoint: rows {a, b, kl, a_mean, a_half, b_mean, b_half, verdict} with verdict "a > b",
    "a < b" or "overlap" (also when an interval is missing: one seed, or no point)."""
    ci = frontier_table_ci(rows, thresholds, level=level)
    out = []
    for a, b in pairs:
        if a not in ci or b not in ci:
            continue
        for j, t in enumerate(thresholds):
            (am, ah), (bm, bh) = ci[a][j], ci[b][j]
            verdict = "overlap"
            if not any(math.isnan(v) for v in (am, ah, bm, bh)):
                if am - ah > bm + bh:
                    verdict = "a > b"
                elif am + ah < bm - bh:
                    verdict = "a < b"
            out.append(
                {"a": a, "b": b, "kl": t, "a_mean": am, "a_half": ah, "b_mean": bm,
                 "b_half": bh, "verdict": verdict}
            )  # fmt: skip
    return out


def format_table(
    table: Mapping[str, Sequence[Any]], thresholds: Sequence[float], *, width: int = 10
) -> str:
    """The table of `frontier_table` (floats) or `frontier_table_ci` ((mean, half-width) pairs,
    shown as "0.52±0.04") as fixed-width text ("—" where a method has no point)."""
    cells_of = {}
    for method, values in table.items():
        cells = []
        for v in values:
            mean, half = v if isinstance(v, tuple) else (v, math.nan)
            if math.isnan(mean):
                cells.append("—")
            elif math.isnan(half):
                cells.append(f"{mean:.3f}")
            else:
                cells.append(f"{mean:.2f}±{half:.2f}")
        cells_of[method] = cells
    width = max([width, *(len(c) + 1 for cs in cells_of.values() for c in cs)])
    head = f"{'method':<14}" + "".join(f"{f'KL<={t:g}':>{width}}" for t in thresholds)
    lines = [head, "-" * len(head)]
    for method, cells in cells_of.items():
        lines.append(f"{method:<14}" + "".join(f"{c:>{width}}" for c in cells))
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
    level: float = 0.95,
) -> epath.Path:
    """Scatter of reward against KL(π ‖ π_ref), one colour and marker per method (paper Fig. 2
    left): every evaluation of every run (every seed) is a point; SFT is a star.

    Args:
      rows: frontier points (keys `COLUMNS`).
      path: the PNG to write.
      title, reward_label: figure texts.
      envelope: also draw each method's frontier (`frontier_bands`): the mean over seeds of the
        best reward so far along increasing KL, with its `level` confidence band shaded when
        there are several seeds.
    Returns:
      The path written.
    """
    from matplotlib.figure import Figure  # no pyplot: any backend (or none) will do

    rows = list(rows)
    fig = Figure(figsize=(8.4, 4.8))
    ax = fig.subplots()
    max_kl = max([float(r["kl"]) for r in rows] + [1e-3])
    all_bands = frontier_bands(rows, np.linspace(0.0, max_kl, 400), level=level) if envelope else []
    for method in METHODS:
        points = sorted((float(r["kl"]), float(r["reward"])) for r in rows if r["method"] == method)
        if not points:
            continue
        label, color, marker = _STYLE[method]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if method == "sft":
            ax.scatter([np.mean(xs)], [np.mean(ys)], c=color, marker=marker, s=160, label=label,
                       zorder=4)  # fmt: skip
            continue
        alpha = 0.75 if len({r["seed"] for r in rows}) == 1 else 0.35
        ax.scatter(
            xs, ys, c=color, marker=marker, s=22, alpha=alpha, label=label, edgecolors="none"
        )
        if envelope:
            band = [b for b in all_bands if b["method"] == method]
            if band:
                bx = [b["kl"] for b in band]
                ax.plot(bx, [b["mean"] for b in band], color=color, lw=1.3, alpha=0.9)
                if band[0]["seeds"] > 1:
                    lo, hi = [b["lo"] for b in band], [b["hi"] for b in band]
                    ax.fill_between(bx, lo, hi, color=color, alpha=0.15, lw=0)
    ax.set_xlabel("KL(π ‖ π_ref)  [nats per completion]")
    ax.set_ylabel(reward_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=130, format=os.fspath(path).rsplit(".", 1)[-1])
    paths.write_bytes_atomic(path, buf.getvalue())
    return paths.as_path(path)
