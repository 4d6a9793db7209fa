"""The checks at the door at their exact boundaries, both sides of each (`run.checks.validate`,
`run.checks.check_batch` / `init_distributed` / `lora_config`, `lora.LoraConfig`,
`train.state.HPARAM_RANGES`, `stages.Schedule`, `train.make_optimizer`).

Every boundary comes from the documented range: "in [0, 0.5)" refuses 0.5 and accepts 0,
"> 0" refuses 0, ">= 1" refuses 0 and accepts 1, "< --steps" refuses the number of steps."""

import dataclasses

import jax.numpy as jnp
import pytest

from rlhf_jax import distributed, lora, models, stages, train
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import checks, cli


@dataclasses.dataclass(frozen=True)
class _Config:
    steps: int = 10
    warmup_steps: int = 0
    batch_size: int = 8
    learning_rate: float = 1e-3
    log_every: int = 5
    beta: float = 0.1
    label_smoothing: float = 0.0
    kl_coef: float = 0.05
    temperature: float = 1.0
    max_length: int = 16
    max_prompt_length: int = 4
    max_new_tokens: int = 4
    completions_per_prompt: int = 4
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    logits_chunk: int | None = None
    microbatches: int = 1
    weight_decay: float = 0.0
    target_kl: float = 6.0
    ppo_epochs: int = 1
    eval_batches: int = 1
    seed: int = 0
    betas: tuple[float, ...] = (0.1,)
    kl_coefs: tuple[float, ...] = (0.0,)
    alphas: tuple[float, ...] = (0.0,)
    count_steps: bool = False  # a bool named like a count: no number, so no range applies


# (field, the first refused value, the last accepted value) on each side that has a boundary.
BOUNDARIES = [
    ("warmup_steps", -1, 0),
    ("warmup_steps", 10, 9),  # < --steps (10)
    ("steps", 0, 1),
    ("batch_size", 0, 1),
    ("learning_rate", 0.0, 1e-12),
    ("log_every", 0, 1),
    ("beta", 0.0, 1e-9),
    ("label_smoothing", 0.5, 0.4999),
    ("label_smoothing", -1e-9, 0.0),
    ("kl_coef", -1e-9, 0.0),
    ("temperature", -1e-9, 0.0),
    ("max_length", 1, 2),
    ("max_prompt_length", 0, 1),
    ("max_new_tokens", 0, 1),
    ("completions_per_prompt", 1, 2),
    ("lora_rank", -1, 0),
    ("lora_alpha", 0.0, 1e-9),
    ("lora_dropout", 1.0, 0.999),
    ("lora_dropout", -1e-9, 0.0),
    ("logits_chunk", 0, 1),
    ("microbatches", 0, 1),
    ("weight_decay", -1e-9, 0.0),
    ("target_kl", 0.0, 1e-9),
    ("ppo_epochs", 0, 1),
    ("eval_batches", -1, 0),
    ("seed", -1, 0),
    ("betas", (0.1, 0.0), (0.1, 1e-9)),  # each value of a sweep
    ("kl_coefs", (0.1, -1e-9), (0.1, 0.0)),
    ("alphas", (-1e-9,), (0.0,)),
]


@pytest.mark.parametrize("field, refused, accepted", BOUNDARIES)
def test_validate_at_each_boundary(field, refused, accepted):
    flag = "--" + field.replace("_", "-")
    checks.validate(dataclasses.replace(_Config(), **{field: accepted}))
    with pytest.raises(ConfigError, match=f"^{flag} "):
        checks.validate(dataclasses.replace(_Config(), **{field: refused}))


def test_validate_leaves_bools_none_and_unruled_fields_alone():
    checks.validate(_Config(count_steps=False, logits_chunk=None))  # False is not < 1 steps
    with pytest.raises(ConfigError, match="--betas: give at least one value"):
        checks.validate(_Config(betas=()))


@pytest.mark.parametrize(
    "hparams, ok",
    [
        ({"label_smoothing": 0.5}, False),
        ({"label_smoothing": 0.4999}, True),
        ({"label_smoothing": 0.0}, True),
        ({"beta": 0.0}, False),
        ({"beta": 1e-9}, True),
        ({"alpha": -1e-9}, False),
        ({"alpha": 0.0}, True),
        ({"kl_coef": -1e-9}, False),
        ({"kl_coef": 0.0}, True),
    ],
)
def test_hparam_ranges_at_each_boundary(hparams, ok):
    if ok:
        train.check_hparams(hparams)
    else:
        with pytest.raises(ValueError, match=f"hparams\\['{next(iter(hparams))}'\\] must be"):
            train.check_hparams(hparams)


@pytest.mark.parametrize(
    "kwargs, ok",
    [
        ({"rank": 0}, False),
        ({"rank": 1}, True),
        ({"alpha": 0.0}, False),
        ({"alpha": 1e-9}, True),
        ({"dropout": 1.0}, False),
        ({"dropout": 0.999}, True),
        ({"dropout": -1e-9}, False),
        ({"dropout": 0.0}, True),
    ],
)
def test_lora_config_at_each_boundary(kwargs, ok):
    if ok:
        lora.LoraConfig(**kwargs)
    else:
        with pytest.raises(ValueError, match="LoRA"):
            lora.LoraConfig(**kwargs)


@dataclasses.dataclass(frozen=True)
class _LoraFlags(cli.LoraFlags):
    pass


def test_cli_lora_config_refuses_dropout_one_and_accepts_just_below():
    model = models.get_config("tiny", vocab_size=64, max_len=16, n_layers=1)
    got = cli.lora_config(_LoraFlags(lora_rank=1, lora_dropout=0.999), model)
    assert (got.rank, got.dropout) == (1, 0.999)
    with pytest.raises(ConfigError, match=r"--lora-\*: LoRA dropout must be in \[0, 1\), got 1"):
        cli.lora_config(_LoraFlags(lora_rank=1, lora_dropout=1.0), model)
    assert cli.lora_config(_LoraFlags(lora_rank=0), model) is None
    with pytest.raises(ConfigError, match="--quantize int8 needs --lora-rank > 0"):
        cli.lora_config(_LoraFlags(lora_rank=0, quantize="int8"), model)


@pytest.mark.parametrize(
    "mesh, batch, microbatches, ok",
    [
        ("data=8", 16, 2, True),  # 8 rows per microbatch: one per device
        ("data=8", 16, 4, False),  # 4 rows cannot split over 8 devices
        ("data=8", 8, 2, False),  # the smallest K > 1 is checked too
        ("data=8", 8, 1, True),
        ("data=1,fsdp=1,tensor=8", 8, 8, True),  # microbatches == batch size: one row each
        ("data=1,fsdp=1,tensor=8", 8, 16, False),  # more microbatches than rows
        ("data=1,fsdp=1,tensor=8", 8, 3, False),  # not a divisor
        ("data=2,fsdp=4", 8, 1, True),  # batch == data x fsdp
        ("data=2,fsdp=4", 4, 1, False),
    ],
)
def test_check_batch_at_each_boundary(mesh, batch, microbatches, ok):
    mesh = checks.resolve_mesh(mesh)
    if ok:
        assert checks.check_batch(batch, mesh, microbatches=microbatches) == batch
    else:
        with pytest.raises(ConfigError, match="--microbatches|--batch-size"):
            checks.check_batch(batch, mesh, microbatches=microbatches)


@dataclasses.dataclass(frozen=True)
class _Dist(cli.DistributedFlags):
    pass


@pytest.mark.parametrize(
    "flags, ok",
    [
        ({"coordinator_address": "h:65535"}, True),
        ({"coordinator_address": "h:65536"}, False),
        ({"coordinator_address": "h:1"}, True),
        ({"coordinator_address": "h:0"}, False),
        ({"coordinator_address": ":8476"}, False),
        ({"num_processes": 4, "process_id": 3, "coordinator_address": "h:1"}, True),
        ({"num_processes": 4, "process_id": 4, "coordinator_address": "h:1"}, False),
        ({"num_processes": -1}, False),
        ({"heartbeat_timeout_s": 1}, True),
        ({"heartbeat_timeout_s": 0}, False),
        ({"initialization_timeout_s": 1}, True),
        ({"initialization_timeout_s": 0}, False),
        ({"distributed": "off", "process_id": 0}, False),
        ({"distributed": "off", "process_id": -1}, True),
    ],
)
def test_init_distributed_at_each_boundary(monkeypatch, flags, ok):
    calls = []
    monkeypatch.setattr(
        distributed, "init_distributed", lambda *a, **kw: calls.append((a, kw)) or False
    )
    config = _Dist(**flags)
    if not ok:
        with pytest.raises(ConfigError):
            checks.init_distributed(config)
        assert calls == []  # refused before any connection
        return
    checks.init_distributed(config)
    if config.distributed == "off":
        assert calls == []
        return
    (address, count, index), kw = calls[0]
    assert address == (config.coordinator_address or None)
    assert count == (config.num_processes or None)
    assert index == (None if config.process_id < 0 else config.process_id)
    assert kw["heartbeat_timeout_s"] == config.heartbeat_timeout_s
    assert kw["initialization_timeout_s"] == config.initialization_timeout_s


@pytest.mark.parametrize(
    "kwargs, ok",
    [
        ({"warmup_steps": 10}, False),  # == steps while decaying to 0 at steps
        ({"warmup_steps": 9}, True),
        ({"warmup_steps": 10, "decay": False}, True),  # constant after warmup: any length
        ({"warmup_steps": -1, "decay": False}, False),
        ({"microbatches": 8}, True),  # == batch_size
        ({"microbatches": 16}, False),
        ({"microbatches": 3}, False),
        ({"microbatches": 0}, False),
        ({"eval_every": 0}, False),
        ({"eval_every": 1}, True),
        ({"log_every": 0}, False),
        ({"checkpoint_every": 0}, False),
        ({"checkpoint_every": 1}, True),
        ({"learning_rate": 0.0}, False),
        ({"weight_decay": -1e-9}, False),
        ({"steps": 1}, True),
    ],
)
def test_schedule_at_each_boundary(kwargs, ok):
    args = {"steps": 10, "batch_size": 8, "learning_rate": 1e-3, **kwargs}
    if ok:
        stages.Schedule(**args)
    else:
        with pytest.raises(ValueError, match="must be"):
            stages.Schedule(**args)


def test_make_optimizer_needs_more_steps_than_warmup():
    with pytest.raises(ValueError, match=r"total_steps \(4\) must exceed warmup_steps \(4\)"):
        train.make_optimizer(1.0, warmup_steps=4, total_steps=4)
    opt = train.make_optimizer(1.0, warmup_steps=4, total_steps=5, max_grad_norm=None)
    params = {"w": jnp.ones(())}
    state = opt.init(params)
    moves = []
    for _ in range(6):  # Adam on a constant gradient moves by the learning rate: 0, .25, .5, .75
        # (warmup), 1 (peak), 0 (decayed at total_steps)
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        moves.append(-float(updates["w"]))
    assert moves == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.0], abs=1e-4)
