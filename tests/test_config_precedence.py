"""Which value wins when a stored configuration and the user's disagree:

- a resumed `runner.fit` runs with its NEW steps, log_every, checkpoint_every, eval_every and
  keep (rows, evaluations and checkpoints at the new intervals, the new number kept);
- `cli.write_run_config`: each field a resume may change (docs/pods.md: the coordinator moves, the
  workdir may be copied, the run extended) is accepted and stored; any other change is refused
  naming it; a driver's own `resumable` list is the one applied;
- a stage's stored `model_config.json` (dtype, remat: HF's config.json has neither) over the HF
  folder's defaults, and the caller's overrides over both (`handover.init_config`,
  `load_init_params`); the memory flags over the stored or random-init model config
  (`cli.prepare_init`), "keep" / None leaving it as stored;
- `stages.Schedule.from_config`: the config's fields, then the overrides; `fit_kwargs` passes
  each on;
- `cli.parse_config`: a flag over the preset's value, also a flag equal to the class default.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.run_inputs import RunConfig

from rlhf_jax import data, models, stages
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import cli, handover, runner
from rlhf_jax.run.metrics_writer import read_metrics

_OPT = optax.adam(0.05)


def _state():
    params = {"w": np.zeros((4,), np.float32)}
    return {"params": params, "opt_state": _OPT.init(params), "step": np.zeros((), np.int32)}


def _step(state, batch):
    def loss_fn(p):
        return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = _OPT.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, {"loss": loss}


def _loader():
    rs = np.random.RandomState(0)
    xs = rs.randn(40, 4).astype(np.float32)
    rows = [{"x": x, "y": np.float32(x.sum())} for x in xs]
    return data.make_loader(rows, batch_size=8, seed=0)


def test_a_resumed_fit_runs_at_its_new_intervals_and_keeps_its_new_number(tmp_path):
    evals = []

    def fit(**kw):
        return runner.fit(
            _step, _state(), _loader(), workdir=tmp_path, progress=False,
            eval_fn=lambda state, t: evals.append(t) or {"t": t}, **kw,
        )  # fmt: skip

    fit(steps=6, log_every=2, checkpoint_every=3, keep=5, eval_every=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 3, 4, 6]
    assert evals == [3, 6]
    _, rows = fit(steps=14, log_every=4, checkpoint_every=5, keep=2, eval_every=7)
    # Steps 7..14 at the new settings: logs at multiples of 4, evaluations (also logged) at
    # multiples of 7, checkpoints at multiples of 5, and all of them at the last step; two kept.
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 7, 8, 12, 14]
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 3, 4, 6, 7, 8, 12, 14]
    assert evals == [3, 6, 7, 14]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [10, 14]


@dataclasses.dataclass(frozen=True)
class _Run(cli.DistributedFlags, cli.MemoryFlags):
    workdir: str = "w"
    data_dir: str = "data"
    steps: int = 10
    log_every: int = 2
    checkpoint_every: int = 5
    eval_every: int = 5
    keep: int = 3
    learning_rate: float = 1e-3
    seed: int = 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 20),
        ("log_every", 7),
        ("checkpoint_every", 9),
        ("eval_every", 11),
        ("keep", 1),
        ("workdir", "moved"),
        ("data_dir", "/elsewhere/data"),
        ("coordinator_address", "10.0.0.3:8476"),
        ("process_id", 2),
        ("distributed", "off"),
        ("heartbeat_timeout_s", 30),
        ("initialization_timeout_s", 600),
    ],
)
def test_a_resume_may_change_each_resumable_field_and_stores_it(tmp_path, field, value):
    cli.write_run_config(tmp_path, _Run())
    new = dataclasses.replace(_Run(), **{field: value})
    assert cli.write_run_config(tmp_path, new)[field] == value
    stored = json.loads((tmp_path / handover.RUN_CONFIG).read_text())
    assert stored == dataclasses.asdict(new)  # the resumed run's settings are the run's now


@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", 1e-2), ("seed", 1), ("num_processes", 4), ("remat", "full")],
)
def test_any_other_change_is_refused_naming_it(tmp_path, field, value):
    cli.write_run_config(tmp_path, _Run())
    before = (tmp_path / handover.RUN_CONFIG).read_text()
    old = getattr(_Run(), field)
    with pytest.raises(ConfigError, match=f"{field}: {old!r} -> {value!r}"):
        cli.write_run_config(tmp_path, dataclasses.replace(_Run(), **{field: value}))
    assert (tmp_path / handover.RUN_CONFIG).read_text() == before


def test_a_drivers_own_resumable_fields_are_the_ones_applied(tmp_path):
    cli.write_run_config(tmp_path, _Run(), resumable=("steps",))
    cli.write_run_config(tmp_path, _Run(steps=30), resumable=("steps",))
    with pytest.raises(ConfigError, match="log_every: 2 -> 3"):
        cli.write_run_config(tmp_path, _Run(steps=30, log_every=3), resumable=("steps",))
    with pytest.raises(ConfigError, match="learning_rate"):
        cli.write_run_config(tmp_path, _Run(learning_rate=0.5), resumable=("learning_rate",))


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A finished stage's workdir whose model ran in bfloat16 with "dots" remat."""
    from helpers import tiny_lm

    cfg = dataclasses.replace(tiny_lm.config(), dtype="bfloat16", remat="dots")
    params = jax.tree.map(np.asarray, models.init_params(cfg, jax.random.key(0)))
    workdir = tmp_path_factory.mktemp("stage")
    handover.save_lm(workdir, cfg, params)
    return workdir, cfg


def test_the_stored_model_config_then_the_callers_overrides(stage):
    workdir, cfg = stage
    stored = json.loads((workdir / handover.MODEL_CONFIG).read_text())
    assert (stored["dtype"], stored["remat"]) == ("bfloat16", "dots")
    plain = dataclasses.replace(cfg, dtype="float32", remat="none")  # what config.json gives
    assert handover.init_config(workdir / handover.HF_DIR) == plain  # an HF folder: no stage
    assert handover.init_config(workdir) == cfg  # the stage's dtype and remat
    assert handover.init_config(workdir, remat="full") == dataclasses.replace(cfg, remat="full")
    assert handover.init_config(workdir, dtype="float32", remat="none") == plain
    got, _ = handover.load_init_params(workdir, remat="none")
    assert got == dataclasses.replace(cfg, remat="none")
    assert handover.load_init_params(workdir)[0] == cfg


@dataclasses.dataclass(frozen=True)
class _Driver(cli.DistributedFlags, cli.MemoryFlags, cli.LoraFlags):
    workdir: str = "unused"
    init_from: str | None = None
    batch_size: int = 8
    mesh: str = "data=-1"


@pytest.mark.parametrize(
    "flags, want",
    [
        ({}, {}),  # keep: the stored remat and dtype
        ({"remat": "none"}, {"remat": "none"}),  # the flag, also when it is the default
        (
            {"remat": "full", "logits_chunk": 4, "scan_layers": "on"},
            {"remat": "full", "logits_chunk": 4, "scan_layers": True},
        ),
    ],
)
def test_memory_flags_over_the_stored_model_config(stage, flags, want):
    workdir, cfg = stage
    config = dataclasses.replace(_Driver(), init_from=str(workdir), **flags)
    start = cli.prepare_init(config, tokenizer_of=None)
    assert start.model_config == dataclasses.replace(cfg, **want)


@pytest.mark.parametrize(
    "flags, want",
    [
        ({}, {}),
        (
            {"remat": "none", "logits_chunk": 2, "scan_layers": "off"},
            {"remat": "none", "logits_chunk": 2, "scan_layers": False},
        ),
        ({"remat": "dots"}, {"remat": "dots"}),
    ],
)
def test_memory_flags_over_a_random_init(flags, want):
    from helpers import tiny_lm

    model = dataclasses.replace(tiny_lm.config(), remat="full", logits_chunk=8, scan_layers=True)
    config = dataclasses.replace(_Driver(), **flags)
    start = cli.prepare_init(config, random_init=lambda tok: model, tokenizer_of=None)
    assert start.model_config == dataclasses.replace(model, **want)


@dataclasses.dataclass(frozen=True)
class _Scheduled:
    steps: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 2
    weight_decay: float = 0.1
    log_every: int = 3
    checkpoint_every: int = 4
    eval_every: int | None = 5
    microbatches: int = 2
    report_to: tuple[str, ...] = ("wandb",)
    seed: int = 0  # not a schedule field


def test_schedule_from_config_then_overrides():
    got = stages.Schedule.from_config(_Scheduled())
    assert dataclasses.asdict(got) == {
        "steps": 10, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 2, "decay": True,
        "weight_decay": 0.1, "log_every": 3, "checkpoint_every": 4, "eval_every": 5,
        "microbatches": 2, "report_to": ("wandb",),
    }  # fmt: skip
    got = stages.Schedule.from_config(_Scheduled(), steps=20, decay=False, eval_every=None)
    assert (got.steps, got.decay, got.eval_every, got.log_every) == (20, False, None, 3)
    assert got.fit_kwargs() == {
        "steps": 20, "log_every": 3, "checkpoint_every": 4, "eval_every": None,
        "report_to": ("wandb",),
    }  # fmt: skip
    other = stages.Schedule.from_config(_Scheduled(log_every=6, checkpoint_every=7, eval_every=8))
    assert other.fit_kwargs() == {
        "steps": 10, "log_every": 6, "checkpoint_every": 7, "eval_every": 8,
        "report_to": ("wandb",),
    }  # fmt: skip
    # The override reaches the checks: warmup == steps is refused only while decaying.
    with pytest.raises(ValueError, match="warmup_steps must be < steps, got 10"):
        stages.Schedule.from_config(_Scheduled(warmup_steps=10))
    assert not stages.Schedule.from_config(_Scheduled(warmup_steps=10), decay=False).decay


def test_a_flag_wins_over_the_preset_even_at_the_class_default():
    presets = {
        "default": RunConfig(),
        "tiny": RunConfig(steps=2, learning_rate=0.5, betas=(0.3,), init_from="x"),
    }
    got = cli.parse_config(RunConfig, presets, ["--preset", "tiny", "--steps", "10"])
    assert got == RunConfig(steps=10, learning_rate=0.5, betas=(0.3,), init_from="x")
    argv = ["--betas", "0.1", "1.0", "--preset", "tiny", "--init-from", "None"]
    got = cli.parse_config(RunConfig, presets, argv)
    assert got == RunConfig(steps=2, learning_rate=0.5, betas=(0.1, 1.0), init_from=None)
    got = cli.parse_config(RunConfig, presets, ["--preset", "tiny", "--learning-rate", "0.001"])
    assert got.learning_rate == 0.001 == RunConfig().learning_rate and got.steps == 2
