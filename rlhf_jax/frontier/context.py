"""What every stage of the frontier experiment reads (`Context`: the task, the models, the
evaluation prompts and key of a seed) and where its points go (`points_path`, `done_points`,
`rows_from_metrics`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from etils import epath

from rlhf_jax import data as rdata
from rlhf_jax import eval as ev
from rlhf_jax import models, paths, stages, sweeps
from rlhf_jax.data import synthetic
from rlhf_jax.frontier import results as fr
from rlhf_jax.frontier.config import FrontierConfig
from rlhf_jax.run import handover
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


def points_path(ctx: Context, stage: str) -> epath.Path:
    return ctx.root / stage / "points.csv"


def done_points(ctx: Context, stage: str) -> list[dict] | None:
    path = points_path(ctx, stage)
    return fr.read_csv(path) if path.is_file() else None


def rows_from_metrics(rows: list[dict], members: list[tuple[str, str]], seed: int) -> list[dict]:
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
