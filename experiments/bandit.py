"""DPO, its variants and policy gradient against the closed-form optimum on random bandits.

    .venv/bin/python experiments/bandit.py                       # about 30 s on CPU
    .venv/bin/python experiments/bandit.py --preset tiny         # a few seconds
    .venv/bin/python experiments/bandit.py --data expected --label-noise 0 --steps 2000

For each seed a random tabular bandit (reference policy π_ref, reward table r) and a set of
Bradley-Terry comparisons (Eq. 1) sampled from π_ref are drawn. For each β, DPO, cDPO, IPO, hinge
and robust DPO are trained on the comparisons, and REINFORCE ("pg") and PPO on the reward with the
k1 KL penalty (Eq. 3). Every learner is compared with π* of Eq. 4: total-variation distance (mean
over contexts) and the gap to the optimal value of Eq. 3, β log Z(x). The whole training of one
method (all seeds × all β) is one jit-compiled program.

By default the labels are flipped with probability `label_noise` = 0.1 and cDPO / robust DPO are
told ε = `label_smoothing` = 0.1: robust DPO's loss is unbiased under that noise and recovers π*
up to sampling error, plain DPO learns a tempered policy, cDPO a more tempered one, IPO its own
fixed point (`rlhf_jax.bandit.ipo_fixed_point`); the policy-gradient learners use the true reward,
not the comparisons.

Writes into --workdir (default runs/bandit): results.csv (β, method, TV and value gap, mean and std
over seeds) and policies.png (π_ref, π* and each learned policy for one context, per β).
"""

import csv
import dataclasses
import functools
import io
import time
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import bandit as bd
from rlhf_jax import paths
from rlhf_jax.run import checks, cli


@dataclasses.dataclass(frozen=True)
class Config:
    """Random-bandit comparison of preference and policy-gradient learners with π* (Eq. 4)."""

    workdir: str = "runs/bandit"  # where results.csv and policies.png go
    seed: int = 0
    n_seeds: int = 5  # random bandits (each with its own data and training rng)
    n_contexts: int = 8
    n_arms: int = 6
    reward_scale: float = 1.0  # r(x, y) ~ reward_scale · N(0, 1)
    betas: tuple[float, ...] = (0.1, 0.5, 1.0, 5.0)
    methods: tuple[str, ...] = ("dpo", "cdpo", "ipo", "hinge", "robust", "pg", "ppo")
    data: Literal["sampled", "expected"] = "sampled"  # sampled pairs or infinite (expected) data
    n_pairs: int = 50_000  # sampled comparisons per seed
    label_noise: float = 0.1  # probability that a comparison's label is flipped
    label_smoothing: float = 0.1  # ε of cDPO and robust DPO
    steps: int = 1000
    lr: float = 0.05  # peak Adam learning rate (cosine decay to 0)
    n_samples: int = 32  # pg/ppo: samples per context and step
    ppo_epochs: int = 4
    plot_context: int = 0  # context of seed 0 shown in policies.png


PRESETS = {
    "default": Config(),  # 5 bandits of 8 contexts x 6 arms, 4 betas, 7 learners
    "tiny": Config(  # a seconds-long smoke run
        workdir="runs/bandit_tiny",
        n_seeds=2,
        n_contexts=3,
        n_arms=4,
        betas=(0.5, 2.0),
        n_pairs=2000,
        steps=100,
    ),
}


def _make_data(config: Config, rng: jax.Array) -> tuple[bd.Bandit, jax.Array]:
    """One seed's bandit and preference table W[x, winner, loser]."""
    rng_bandit, rng_pairs = jax.random.split(rng)
    bandit = bd.random_bandit(
        rng_bandit, config.n_contexts, config.n_arms, reward_scale=config.reward_scale
    )
    if config.data == "expected":
        weights = bd.expected_preference_pairs(
            bandit.ref_probs, bandit.rewards, label_noise=config.label_noise
        )
    else:
        prefs = bd.bradley_terry_preferences(
            rng_pairs,
            bandit.rewards,
            bandit.ref_probs,
            config.n_pairs,
            label_noise=config.label_noise,
        )
        weights = bd.preference_weights(prefs, config.n_contexts, config.n_arms)
    return bandit, weights


@functools.partial(jax.jit, static_argnums=0)
def _setup(config: Config, rng: jax.Array) -> tuple[bd.Bandit, jax.Array, jax.Array]:
    """All seeds' bandits [seeds, X, K], preference tables [seeds, X, K, K] and training keys."""
    rng_data, rng_train = jax.vmap(jax.random.split, out_axes=1)(
        jax.random.split(rng, config.n_seeds)
    )
    bandits, weights = jax.vmap(functools.partial(_make_data, config))(rng_data)
    return bandits, weights, rng_train


def _train_all(config: Config, method: str, bandits, weights, betas, rngs) -> jax.Array:
    """Final policies [seeds, β, X, K] of one method: one jit over vmap(seeds) ∘ vmap(β)."""
    train = functools.partial(
        bd.train_policy,
        method,
        steps=config.steps,
        lr=config.lr,
        label_smoothing=config.label_smoothing,
        n_samples=config.n_samples,
        ppo_epochs=config.ppo_epochs,
    )

    def one_seed(bandit, weights, rng):
        over_beta = jax.vmap(lambda beta: train(bandit, weights, beta, rng).logits)
        return jax.nn.softmax(over_beta(betas), axis=-1)  # [β, X, K]

    return jax.jit(jax.vmap(one_seed))(bandits, weights, rngs)


@jax.jit
def _evaluate(policies, bandits, betas) -> tuple[dict[str, jax.Array], jax.Array]:
    """Metrics [methods, seeds, β] of policies [methods, seeds, β, X, K]; π* [seeds, β, X, K]."""
    evaluate = jax.vmap(jax.vmap(bd.evaluate_policy, (0, None, 0)), (0, 0, None))  # seeds, β
    optimum = jax.vmap(
        lambda b: jax.vmap(lambda beta: bd.optimal_policy(b.ref_probs, b.rewards, beta))(betas)
    )(bandits)
    return jax.vmap(evaluate, (0, None, None))(policies, bandits, betas), optimum


def _plot(config: Config, path: str, policies: dict[str, np.ndarray], optimum: np.ndarray) -> None:
    """Bars of π_ref and each method's policy, and π*, for one context of seed 0; a panel per β."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = config.plot_context
    n_beta = len(config.betas)
    fig, axes = plt.subplots(1, n_beta, figsize=(4.2 * n_beta, 3.6), sharey=True, squeeze=False)
    arms = np.arange(config.n_arms)
    width = 0.8 / len(policies)
    for j, (ax, beta) in enumerate(zip(axes[0], config.betas)):
        for i, (name, probs) in enumerate(policies.items()):
            ax.bar(arms - 0.4 + (i + 0.5) * width, probs[0, j, x], width, label=name)
        ax.scatter(
            arms, optimum[0, j, x], marker="_", s=600, c="k", linewidths=2, label="π* (Eq. 4)"
        )
        ax.set_title(f"β = {beta:g}")
        ax.set_xlabel("arm y")
        ax.set_xticks(arms)
    axes[0, 0].set_ylabel(f"π(y | x={x})")
    axes[0, -1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"learned policies vs π* ({config.data} data, label noise {config.label_noise:g})")
    fig.tight_layout()
    buf = io.BytesIO()  # a local file or a cloud object (gs://): `rlhf_jax.paths`
    fig.savefig(buf, dpi=110, bbox_inches="tight", format="png")
    paths.write_bytes_atomic(path, buf.getvalue())
    plt.close(fig)


def main(config: Config) -> list[dict]:
    """Run the comparison, print the table, write results.csv and policies.png; return the rows."""
    start = time.perf_counter()
    for method in config.methods:
        if method not in bd.METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {bd.METHODS}")
    bandits, weights, rng_train = _setup(config, jax.random.key(config.seed))
    betas = jnp.asarray(config.betas, jnp.float32)
    shape = (config.n_seeds, len(config.betas), config.n_contexts, config.n_arms)
    policies = {"π_ref": jnp.broadcast_to(bandits.ref_probs[:, None], shape)}
    for method in config.methods:
        policies[method] = _train_all(config, method, bandits, weights, betas, rng_train)
    metrics, optimum = jax.device_get(_evaluate(jnp.stack(list(policies.values())), bandits, betas))
    policies = {k: np.asarray(v) for k, v in policies.items()}

    rows = []
    for i, name in enumerate(policies):
        for j, beta in enumerate(config.betas):
            tv, gap = metrics["tv"][i, :, j], metrics["value_gap"][i, :, j]  # [seeds]
            rows.append(
                {
                    "beta": beta,
                    "method": name,
                    "tv_mean": float(tv.mean()),
                    "tv_std": float(tv.std()),
                    "gap_mean": float(gap.mean()),
                    "gap_std": float(gap.std()),
                }
            )
    rows.sort(key=lambda r: (r["beta"], r["method"] != "π_ref"))
    elapsed = time.perf_counter() - start

    csv_path = paths.as_path(config.workdir) / "results.csv"
    f = io.StringIO(newline="")
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths.write_text_atomic(csv_path, f.getvalue())
    png_path = paths.as_path(config.workdir) / "policies.png"
    _plot(config, str(png_path), policies, optimum)

    data = "expected pairs" if config.data == "expected" else f"{config.n_pairs} sampled pairs"
    print(
        f"{config.n_seeds} random bandits ({config.n_contexts} contexts × {config.n_arms} arms), "
        f"{data}, label noise {config.label_noise:g}, cDPO/robust ε {config.label_smoothing:g}, "
        f"{config.steps} steps; mean ± std over seeds"
    )
    print(f"{'β':>6}  {'method':<8}  {'TV(π, π*)':>17}  {'gap to max Eq. 3':>19}")
    for r in rows:
        print(
            f"{r['beta']:>6g}  {r['method']:<8}  {r['tv_mean']:8.4f} ± {r['tv_std']:.4f}  "
            f"{r['gap_mean']:9.5f} ± {r['gap_std']:.5f}"
        )
    print(f"trained and evaluated in {elapsed:.1f} s")
    print(f"wrote {csv_path}")
    print(f"wrote {png_path}")
    return rows


def _cli(argv: Sequence[str] | None = None) -> Config:
    """`--preset NAME` (default, tiny) and any field as a flag, checked at the door."""
    config = cli.parse_config(Config, PRESETS, argv, description=__doc__)
    checks.validate(
        config,
        {
            "label_noise": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
            "n_pairs": (lambda v: v >= 1, ">= 1"),
            "n_seeds": (lambda v: v >= 1, ">= 1"),
            "n_contexts": (lambda v: v >= 1, ">= 1"),
            "n_arms": (lambda v: v >= 2, ">= 2"),
            "n_samples": (lambda v: v >= 2, ">= 2 (leave-one-out baseline)"),
            "betas": (lambda v: v > 0, "> 0"),
            "methods": (lambda m: m in bd.METHODS, f"one of {', '.join(bd.METHODS)}"),
            "plot_context": (lambda v: 0 <= v < config.n_contexts, "in [0, --n-contexts)"),
        },
    )
    return config


def main_cli(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the command line `argv`; returns the result rows."""
    return main(_cli(argv))


if __name__ == "__main__":
    cli.run_cli(main_cli)
