"""Critic-free RL (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++) on the offline verifiable-reward
task (multi-digit addition, exact-match reward), on the offline sentiment task (a learned reward
model or the ground-truth VADER reward), or on your prompts with Python rewards (--dataset).

    .venv/bin/python experiments/grpo.py --preset tiny --workdir runs/grpo_tiny   # seconds
    .venv/bin/python experiments/grpo.py --workdir runs/grpo                    # ~1.5 min on CPU
    .venv/bin/python experiments/grpo.py --algo rloo --kl-coef 0.05 --kl-in reward
    .venv/bin/python experiments/grpo.py --algo dapo --num-groups 16 --prompts-per-step 32
    .venv/bin/python experiments/grpo.py --task sentiment --init-from runs/sft --reward runs/rm
    .venv/bin/python experiments/grpo.py --task sentiment --init-from runs/sft --reward ground-truth
    .venv/bin/python experiments/grpo.py --init-from MODEL --dataset gsm8k.jsonl \\
        --columns prompt=question --reward-fn my_rewards:format_ok my_rewards:exact_match \\
        --reward-weights 0.5 1.0

Arithmetic. Stage 1 (WORKDIR/sft/, skipped with --init-from): a small decoder from random init
learns addition from noisy demonstrations (`data.arithmetic`: a fraction --noise of the answers has
its last digit one too high, a consistent annotator error), so its greedy held-out pass@1 starts
low. Stage 2 (WORKDIR/): --steps iterations of --algo, each ONE compiled program:
--prompts-per-step prompts x --group-size completions (`generate(num_samples=G)`), the exact-match
reward in JAX on token ids, group advantages and the clipped policy-gradient update
(`stages.train_critic_free`). Writes pass_at_1.json (held-out greedy pass@1 of the SFT model and
of the final one) and eval/pass_at_1 every --eval-every steps.

Sentiment. --init-from is the SFT workdir of experiments/sft.py (or an HF folder); --reward a
reward-model workdir (reward_model.py; scored inside the one compiled iteration) or
`ground-truth` (VADER on the decoded texts, on the host between the compiled rollout and the
compiled update). Every --eval-every steps: the mean ground-truth reward and the exact KL to the
SFT model on --eval-prompts held-out prompts (eval/reward, eval/kl).

Your data. --dataset (prompt-only or prompt-completion rows in TRL's formats, text or
conversational; docs/your_data.md) with --init-from a model folder: the prompts are the dataset's,
tokenized with the folder's own tokenizer and chat template, and the reward is --reward-fn,
Python functions with TRL's signature `fn(prompts, completions, **columns) -> list[float | None]`
that see the dataset's other columns (e.g. a ground-truth `answer`), summed with --reward-weights
(None: not applicable, counts 0); each one's mean is logged as rewards/<name>, every scored row
goes to WORKDIR/completions.jsonl. --reward REWARD_MODEL_WORKDIR scores instead.

All: with --kl-coef > 0 the starting model is the frozen reference and --kl-in puts β k3 in the
loss (GRPO) or β k1 in the reward (Eq. 3). DAPO's dynamic sampling (on for dapo, or
--dynamic-sampling True) trains on the first --num-groups groups whose rewards differ (default:
every informative group of the batch); --overlong-cache L turns on DAPO's overlong penalty over
the last L of --max-new-tokens.

--lora-rank R trains LoRA adapters on the frozen starting model, which is also the reference
(adapters off); --quantize int8|nf4 stores it quantized (QLoRA); adapter/ holds the adapters in
PEFT's format and hf/ the merged model.

Writes WORKDIR/run_config.json, metrics.jsonl (reward, loss, clip fractions, entropy,
groups_kept, ...), checkpoints/ (rerun to resume) and hf/.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Literal

import jax
import numpy as np

from rlhf_jax import data as rdata
from rlhf_jax import distributed, lora, losses, models, paths, plugins, sharding, stages, train
from rlhf_jax import eval as ev
from rlhf_jax.data import arithmetic as ar
from rlhf_jax.data import synthetic, tasks
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import cli, dataset, handover, reporting, runner, samples
from rlhf_jax.run import rewards as rw
from rlhf_jax.sampling import SamplingConfig, generate

GROUND_TRUTH = "ground-truth"


@dataclasses.dataclass(frozen=True)
class Config(
    cli.DistributedFlags,
    cli.MemoryFlags,
    cli.LoraFlags,
    dataset.DataFlags,
    reporting.ReportFlags,
    samples.SampleFlags,
):
    """Critic-free RL on the addition task, the sentiment task, or --dataset's prompts."""

    workdir: str = "runs/grpo"
    algo: Literal["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"] = "grpo"
    task: Literal["arithmetic", "sentiment"] = "arithmetic"
    data_dir: str = tasks.default_data_dir(__file__)  # sentiment: the prepared synthetic task
    reward: str = GROUND_TRUTH  # sentiment: a reward-model workdir, or "ground-truth" (VADER)
    reward_fn: tuple[str, ...] = ()  # --dataset: Python rewards, module:function or file.py:fn
    reward_weights: tuple[float, ...] = ()  # one per --reward-fn (default 1 each)
    max_new_tokens: int = 24  # sentiment (arithmetic: the answer length)
    max_prompt_length: int = 8  # sentiment
    digits: int = 2  # operands of 1..digits digits
    noise: float = 0.6  # fraction of SFT answers with the last digit one too high
    init_from: str | None = None  # an SFT workdir or HF folder of this task; None: stage 1
    model: str = "tiny"  # models.PRESETS name for the random init of stage 1
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    sft_steps: int = 2000
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    steps: int = 300  # RL iterations
    prompts_per_step: int = 32  # global, over all devices and hosts
    group_size: int = 8
    learning_rate: float = 1e-3
    kl_coef: float = 0.0
    kl_in: Literal["loss", "reward"] = "loss"
    baseline: str | None = None  # mean, leave_one_out or module:function (None: the algo's)
    kl_estimator: str | None = None  # k1, k2, k3 or module:function (None: k3 loss, k1 reward)
    temperature: float = 1.0
    dynamic_sampling: bool | None = None  # DAPO's (None: on for dapo only)
    num_groups: int | None = None  # groups trained per step with dynamic sampling (None: all)
    overlong_cache: int | None = None  # DAPO's overlong penalty ramp, in tokens (None: off)
    eval_prompts: int = 512  # held-out problems (greedy pass@1) or prompts (reward, KL)
    eval_every: int = 100
    log_every: int = 20
    checkpoint_every: int = 100
    seed: int = 0
    mesh: str = "data=-1"  # data=D,fsdp=F,tensor=T (-1: the remaining devices)


PRESETS = {
    "default": Config(),
    "tiny": Config(
        workdir="runs/grpo_tiny",
        digits=1,
        d_model=32,
        n_layers=1,
        n_heads=2,
        sft_steps=40,
        sft_batch_size=16,
        steps=6,
        prompts_per_step=8,
        group_size=4,
        eval_prompts=32,
        eval_every=3,
        log_every=2,
        checkpoint_every=3,
    ),
}


def _task(config: Config) -> ar.ArithmeticTask:
    return ar.ArithmeticTask(digits=config.digits, noise=config.noise)


def _model_config(config: Config, task: ar.ArithmeticTask) -> models.TransformerConfig:
    return models.get_config(
        config.model,
        vocab_size=16,  # 14 ids, rounded to a multiple of 8
        max_len=task.prompt_length + task.answer_length,
        d_model=config.d_model,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
    )


def _demonstrations(task: ar.ArithmeticTask, config: Config, mine: np.ndarray) -> Iterator[dict]:
    """SFT batches, deterministic in the step (a resumed run continues the same stream): rows
    `mine` (this host's, `sharding.process_batch_rows`) of each global batch."""
    n = 64 * config.sft_batch_size
    demos = task.demonstrations(task.problems(n, config.seed), config.seed + 1)
    step = 0
    while True:
        rows = (step * config.sft_batch_size + mine) % n
        yield {k: v[rows] for k, v in demos.items()}
        step += 1


def _prompts(task: ar.ArithmeticTask, config: Config, mine: np.ndarray) -> Iterator[dict]:
    """The training prompts, rows `mine` (this host's) of each global batch."""
    problems = task.problems(64 * config.prompts_per_step, config.seed + 2)
    step = 0
    while True:
        rows = (step * config.prompts_per_step + mine) % len(problems)
        tokens, mask = task.prompts(problems[rows])
        yield {"prompt_tokens": tokens, "prompt_mask": mask}
        step += 1


def pass_at_1_fn(model, task: ar.ArithmeticTask, n: int, seed: int):
    """`fn(params) -> float`: greedy exact-match rate on `n` held-out problems."""
    prompts, mask = task.prompts(task.problems(n, 10_000 + seed))  # another stream than training
    greedy = jax.jit(
        lambda params: generate(
            model, params, prompts, mask, jax.random.key(0), max_new_tokens=task.answer_length,
            temperature=0.0, eos_id=ar.EOS, pad_id=ar.PAD,
        )
    )  # fmt: skip

    def fn(params) -> float:
        out = greedy(params)
        return float(ar.exact_match_reward(prompts, mask, out.tokens, out.mask).mean())

    return fn


def _policy_params(state):
    """The policy of a critic-free state: its params, or (LoRA) the adapters on their base."""
    base = (state.frozen or {}).get("base")
    return state.params if base is None else {"base": base, "lora": state.params}


def _rl_config(config: Config, max_new_tokens: int, eos_id: int, pad_id: int):
    """The method's config, its user functions (--baseline, --kl-estimator) imported: at the
    door, so a bad name or combination is one line before anything is written."""
    try:
        chosen = dict(
            baseline=config.baseline and plugins.choose(
                config.baseline, ("mean", "leave_one_out"), flag="--baseline"
            ),
            kl_estimator=config.kl_estimator and plugins.choose(
                config.kl_estimator, losses.KL_ESTIMATORS, flag="--kl-estimator"
            ),
        )  # fmt: skip
        return train.CriticFreeConfig(
            algo=config.algo, group_size=config.group_size, kl_in=config.kl_in,
            temperature=config.temperature, max_new_tokens=max_new_tokens, eos_id=eos_id,
            pad_id=pad_id, dynamic_sampling=config.dynamic_sampling,
            num_groups=config.num_groups, overlong_cache=config.overlong_cache, **chosen,
        )  # fmt: skip
    except ValueError as e:
        message = str(e)
        if not message.startswith("--"):  # the config's own check: name the flags
            message = f"--algo {config.algo}: {message}"
        raise ConfigError(message) from None


def _schedule(config: Config) -> stages.Schedule:
    return stages.Schedule(
        steps=config.steps, batch_size=config.prompts_per_step,
        learning_rate=config.learning_rate, decay=False, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, eval_every=config.eval_every,
        report_to=config.report_to,
    )  # fmt: skip


def _check(config: Config, max_new_tokens: int) -> None:
    """The checks that name a flag, before any side effect."""
    dynamic = config.dynamic_sampling or (config.dynamic_sampling is None and config.algo == "dapo")
    if config.num_groups is not None:
        if not dynamic:
            raise ConfigError(
                "--num-groups applies with dynamic sampling (--algo dapo or --dynamic-sampling)"
            )
        if not 1 <= config.num_groups <= config.prompts_per_step:
            raise ConfigError(
                f"--num-groups {config.num_groups} must be in [1, --prompts-per-step "
                f"{config.prompts_per_step}]: the kept groups come from the sampled ones"
            )
    if config.overlong_cache is not None and not 1 <= config.overlong_cache <= max_new_tokens:
        raise ConfigError(
            f"--overlong-cache {config.overlong_cache} must be in [1, {max_new_tokens}] (the "
            "completion length cap)"
        )


RULES = {
    "model": (lambda m: m in models.PRESETS, "a models.PRESETS name"),
    "digits": (lambda d: 1 <= d <= 6, "in [1, 6]"),
    "noise": (lambda x: 0 <= x < 1, "in [0, 1)"),
    "group_size": (lambda g: g >= 2, ">= 2"),
    "eval_prompts": (lambda n: n >= 1, ">= 1"),
    "temperature": (lambda t: t > 0, "> 0 (the methods sample)"),
    **cli.ON_POLICY_RULES,
}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the command line `argv`; returns the RL stage's metrics rows."""
    config = cli.parse_config(Config, PRESETS, argv, description=__doc__)
    if config.dataset:
        return _dataset(config)
    if config.reward_fn or config.reward_weights:
        raise ConfigError(
            "--reward-fn / --reward-weights apply to --dataset (the offline tasks have their own "
            "reward)"
        )
    if config.task == "sentiment":
        return _sentiment(config)

    def check(cfg: models.TransformerConfig) -> None:
        task = _task(config)
        if cfg.vocab_size < ar.VOCAB_SIZE or cfg.max_len < task.prompt_length + task.answer_length:
            raise ConfigError(
                f"--init-from {config.init_from}: its model (vocabulary {cfg.vocab_size}, "
                f"context {cfg.max_len}) cannot read {config.digits}-digit problems; train it "
                "with this task"
            )

    start = cli.prepare_init(
        config,
        rules=RULES,
        random_init=lambda _: _model_config(config, _task(config)),
        task=lambda: _task(config),
        tokenizer_of=None,  # the task reads characters: `check` tests the model against it
        batch_fields=("prompts_per_step", "sft_batch_size"),
        check=check,
    )
    if config.reward != GROUND_TRUTH:
        raise ConfigError(
            "--reward applies to --task sentiment; the addition task's reward is the exact match"
        )
    task, cfg, mesh = start.task, start.model_config, start.mesh
    _check(config, task.answer_length)
    rl = _rl_config(config, task.answer_length, ar.EOS, ar.PAD)
    cli.write_run_config(config.workdir, config)  # every check passed: now the workdir
    workdir = paths.as_path(config.workdir)  # local or cloud (gs://)
    model = models.Transformer(cfg)
    if start.lora is not None:
        model = lora.LoraTransformer(cfg, start.lora)  # also reads plain params
    pass_at_1 = pass_at_1_fn(model, task, config.eval_prompts, config.seed)
    callbacks = []
    if config.samples:  # held-out problems, as pass@1's
        tokens, mask = task.prompts(task.problems(config.samples, 10_000 + config.seed))
        callbacks = [
            samples.CompletionSamples(
                {"prompt_tokens": tokens, "prompt_mask": mask}, ar.CharTokenizer(),
                max_new_tokens=task.answer_length, temperature=config.sample_temperature,
                seed=config.seed,
            )
        ]  # fmt: skip

    params = start.load_params()
    if not config.init_from:
        sft = stages.Schedule(
            steps=config.sft_steps, batch_size=config.sft_batch_size,
            learning_rate=config.sft_learning_rate, warmup_steps=min(50, config.sft_steps - 1),
            log_every=max(1, config.sft_steps // 10), checkpoint_every=config.sft_steps,
            report_to=config.report_to,
        )  # fmt: skip
        opt = sft.optimizer()
        state, _ = runner.fit(
            train.make_sft_step(model, opt),
            train.create_train_state(params, opt, 0),
            _demonstrations(task, config, sharding.process_batch_rows(config.sft_batch_size, mesh)),
            workdir=workdir / "sft",
            mesh=mesh,
            desc="sft",
            **sft.fit_kwargs(),
        )
        params = distributed.to_host(state.params)  # gathered when FSDP splits it over hosts
        handover.save_lm(workdir / "sft", cfg, params)
    before = pass_at_1(params)
    prompts = _prompts(task, config, sharding.process_batch_rows(config.prompts_per_step, mesh))
    params, rows = stages.train_critic_free(
        cfg, params, prompts, workdir=workdir, mesh=mesh,
        schedule=_schedule(config), rl=rl, reward_fn=ar.exact_match_reward,
        kl_coef=config.kl_coef, seed=config.seed, lora=start.lora, quantize=config.quantize,
        base_model=start.base_model, callbacks=callbacks,
        eval_fn=lambda state, step: {"pass_at_1": pass_at_1(_policy_params(state))},
    )  # fmt: skip
    after = pass_at_1(params)
    if distributed.is_primary():
        summary = {"algo": config.algo, "sft": before, "final": after, "steps": config.steps}
        paths.write_text_atomic(workdir / "pass_at_1.json", json.dumps(summary, indent=2))
    print(f"{config.algo}: held-out pass@1 {before:.3f} -> {after:.3f}; wrote {workdir}")
    return rows


def _sentiment(config: Config) -> list[dict]:
    """--task sentiment: from an SFT model, on a reward model or the ground truth."""
    start = cli.prepare_init(
        config,
        rules=RULES,
        required=(
            "--task sentiment starts from (and regularises towards) the SFT model: pass "
            "--init-from (an experiments/sft.py workdir or an HF folder)"
        ),
        task=lambda: synthetic.load_task(synthetic.prepare(config.data_dir)),
        batch_fields=("prompts_per_step",),
    )
    if config.reward != GROUND_TRUTH:
        handover.resolve_init_folder(config.reward, kind="reward", flag="--reward")
    _check(config, config.max_new_tokens)
    task, tok, cfg, lora_cfg = start.task, start.tokenizer, start.model_config, start.lora
    rl = _rl_config(config, config.max_new_tokens, tok.eos_id, tok.pad_id)
    cli.write_run_config(config.workdir, config)  # every check passed: now the workdir

    params = start.load_params()
    if config.reward == GROUND_TRUTH:
        reward = {"host_reward": task.reward_fn, "reward_on": "text"}
    else:
        reward = {"reward_model": handover.load_reward_model(config.reward)}
    model = models.Transformer(cfg) if lora_cfg is None else lora.LoraTransformer(cfg, lora_cfg)
    prompts = rdata.tokenize_prompts(
        tok, task.test_prompts[: config.eval_prompts], max_prompt_length=config.max_prompt_length
    )
    sampling = SamplingConfig(config.max_new_tokens, config.temperature)
    callbacks = samples.callbacks_for(
        config, task.test_prompts, tok, max_prompt_length=config.max_prompt_length,
        max_new_tokens=config.max_new_tokens,
    )  # fmt: skip

    def eval_fn(state, step):
        res = ev.evaluate_reward_kl(
            model, _policy_params(state), params, prompts, jax.random.key(config.seed + 12345),
            sampling=sampling, eos_id=tok.eos_id, pad_id=tok.pad_id,
            reward_fn=synthetic.ground_truth_reward, tokenizer=tok, batch_size=256,
        )  # fmt: skip
        return {"reward": res.reward_mean, "kl": res.kl_mean}

    loader = stages.prompt_loader(
        task, batch_size=_schedule(config).local_batch_size,
        max_prompt_length=config.max_prompt_length, seed=config.seed,
    )  # fmt: skip
    _, rows = stages.train_critic_free(
        cfg, params, loader, workdir=config.workdir, mesh=start.mesh, schedule=_schedule(config),
        rl=rl, tokenizer=tok, kl_coef=config.kl_coef, seed=config.seed, eval_fn=eval_fn,
        lora=lora_cfg, quantize=config.quantize, base_model=start.base_model,
        callbacks=callbacks, **reward,
    )  # fmt: skip
    last = rows[-1] if rows else {}
    if "eval/reward" in last:
        print(
            f"{config.algo}: step {last['step']} ground-truth reward {last['eval/reward']:.3f}, "
            f"KL to the SFT model {last['eval/kl']:.2f} nats; wrote {config.workdir}"
        )
    return rows


def _dataset(config: Config) -> list[dict]:
    """--dataset: a researcher's prompts (prompt-only or prompt-completion rows; other columns go
    to the rewards), Python rewards (--reward-fn, weighted) or a reward model (--reward)."""
    start = cli.prepare_init(
        config,
        rules=RULES,
        required="--dataset trains your model: pass --init-from (an HF folder with its tokenizer)",
        batch_fields=("prompts_per_step",),
    )
    tok, cfg = start.tokenizer, start.model_config
    learned = config.reward != GROUND_TRUTH
    functions = rw.from_flags(config, learned=learned)  # imported at the door
    if learned:
        handover.resolve_init_folder(config.reward, kind="reward", flag="--reward")
    prompts = dataset.load(
        config, tok, kinds=("prompt_only", "prompt_completion"),
        max_length=config.max_prompt_length + config.max_new_tokens,
        max_prompt_length=config.max_prompt_length,
    )  # fmt: skip
    _check(config, config.max_new_tokens)
    rl = _rl_config(config, config.max_new_tokens, tok.eos_id, tok.pad_id)
    callbacks = samples.callbacks_for(
        config, prompts, tok, max_prompt_length=config.max_prompt_length,
        max_new_tokens=config.max_new_tokens,
    )  # fmt: skip
    cli.write_run_config(config.workdir, config)  # every check passed: now the workdir

    params = start.load_params()
    if learned:
        reward = {"reward_model": handover.load_reward_model(config.reward)}
    else:
        reward = rw.host_reward(functions, prompts, tok, config.workdir)
    loader = rw.prompt_rows_loader(
        prompts, batch_size=_schedule(config).local_batch_size,
        max_prompt_length=config.max_prompt_length, tokenizer=tok, seed=config.seed,
    )  # fmt: skip
    _, rows = stages.train_critic_free(
        cfg, params, loader, workdir=config.workdir, mesh=start.mesh, schedule=_schedule(config),
        rl=rl, tokenizer=tok, kl_coef=config.kl_coef, seed=config.seed, lora=start.lora,
        quantize=config.quantize, base_model=start.base_model, callbacks=callbacks, **reward,
    )  # fmt: skip
    if rows:
        means = ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k.startswith("rewards/"))
        print(f"{config.algo}: step {rows[-1]['step']} {means}; wrote {config.workdir}")
    return rows


if __name__ == "__main__":
    cli.run_cli(main)
