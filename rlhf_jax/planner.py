"""Will it fit, and how fast can it be: every step compiled ahead of time for a target (a TPU
topology from this CPU host with libtpu, N forced host devices, or the local accelerators), from
abstract inputs, with the project's own partition rules. Nothing is allocated.

    spec = PlanSpec(model="llama-3.1-8b", algo="dpo", topology="v5p:2x2x1", mesh="fsdp=-1",
                    batch=64, seq_len=2048, remat="full", logits_chunk=512)
    for row in plan(spec):          # one row per compiled program ("step", and "generate")
        print(row["program"], row["total_gb"], row["fits"], row["tokens_per_s"])

Per chip, each row gives what `Compiled.memory_analysis()` reports (arguments, temporaries,
outputs, less the donated state aliased into the outputs), the chip's HBM and whether the sum
fits, XLA's FLOPs and bytes (`cost_analysis()`), the model FLOPs (the convention of
`experiments/bench_dpo_step.py`: 6N + 12LTHDh per trained token, 4N + 8LTHDh under LoRA, 2N +
4LTHDh per forward-only token), and the roofline: `max(FLOPs / peak, bytes / bandwidth)` at the
chip's published bf16 peak and HBM bandwidth (`CHIPS`), with the tokens/s and MFU it implies as
upper bounds.

XLA counts a loop's body once (`lax.scan`, the decode `while_loop`), so the compute term takes the
larger of XLA's FLOPs and the model FLOPs per chip, and a program that decodes adds one read of
its parameter bytes per new token to the memory term.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import lora as lora_lib
from rlhf_jax import models, train
from rlhf_jax import sharding as sh
from rlhf_jax.sampling import generate

GIB = float(2**30)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's published figures: HBM bytes, dense bf16 FLOP/s, HBM bytes/s."""

    hbm_bytes: float
    peak_flops: float
    hbm_bandwidth: float
    source: str


# Per chip, dense bf16 (no sparsity). Sources: the vendors' pages, as of 2026.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32 * GIB, 275e12, 1228e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip(16 * GIB, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(95 * GIB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(32 * GIB, 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip(80e9, 989e12, 3350e9, "nvidia.com/en-us/data-center/h100 (SXM)"),
    "h200": Chip(141e9, 989e12, 4800e9, "nvidia.com/en-us/data-center/h200 (SXM)"),
}

ALGOS = ("sft", "reward", "dpo", "ppo") + tuple(train.critic_free.ALGORITHMS)
REFERENCES = ("model", "precomputed", "base")


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """What to plan. `batch` is the global batch: sequences (SFT), pairs (reward, DPO) or prompts
    (PPO, critic-free: each sampled `group_size` times); `seq_len` the tokens per sequence (RL:
    `prompt_len` + `max_new_tokens`, with `prompt_len` = seq_len - max_new_tokens)."""

    model: str
    algo: str = "dpo"
    topology: str = "cpu:8"
    mesh: str = "data=1,fsdp=-1"
    batch: int = 8
    seq_len: int = 512
    lora_rank: int = 0
    quantize: str = "none"
    remat: str = "full"
    microbatches: int = 1  # SFT / reward / DPO: gradient accumulation; RL: minibatches
    ref: str = "model"  # DPO / PPO / critic-free: "model", "precomputed" (DPO), "base" (LoRA)
    loss_type: str = "sigmoid"  # the DPO family's loss (simpo and orpo hold no reference)
    logits_chunk: int | None = None
    scan_layers: bool = False  # the decoder blocks as one lax.scan over the layers
    dtype: str = "bfloat16"
    max_new_tokens: int = 256  # PPO, critic-free
    group_size: int = 8  # critic-free
    ppo_epochs: int = 1
    model_overrides: tuple[tuple[str, Any], ...] = ()  # e.g. (("n_layers", 2),) for tests

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.ref not in REFERENCES:
            raise ValueError(f"ref must be one of {REFERENCES}, got {self.ref!r}")
        if self.ref == "base" and not self.lora_rank:
            raise ValueError("ref 'base' is the LoRA base: set lora_rank > 0")
        if self.lora_rank and self.ref == "model" and self.algo in ("dpo", "ppo", *_CF):
            object.__setattr__(self, "ref", "base")  # LoRA's reference is its base
        if self.loss_type not in train.dpo.LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {train.dpo.LOSS_TYPES}")
        if self.ref == "precomputed" and self.algo != "dpo":
            raise ValueError("ref 'precomputed' is DPO's (reference log-probs in the batch)")
        if self.quantize != "none" and not self.lora_rank:
            raise ValueError(f"quantize {self.quantize} needs lora_rank > 0 (QLoRA)")
        for name in ("batch", "seq_len", "microbatches", "max_new_tokens", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.algo in ("ppo", *_CF) and self.max_new_tokens >= self.seq_len:
            raise ValueError(
                f"max_new_tokens {self.max_new_tokens} leaves no prompt in seq_len {self.seq_len}"
            )


_CF = tuple(train.critic_free.ALGORITHMS)


# --------------------------------------------------------------------------------------------
# Targets


def topology_devices(topology: str) -> tuple[list[Any], Chip | None, str]:
    """(devices, chip figures or None, chip name) of a target: "cpu:N" (the first N host
    devices), "local" (this machine's accelerators) or a TPU topology such as "v5e:2x2" (compiled
    from this host through libtpu).

    Raises:
      ValueError: too few host devices (with the XLA flag to set), an unknown chip, or no libtpu.
    """
    if topology.startswith("cpu:"):
        n = int(topology.split(":", 1)[1])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(
                f"topology {topology}: {len(devices)} host devices; set XLA_FLAGS="
                f"--xla_force_host_platform_device_count={n} before JAX starts"
            )
        return devices[:n], None, "cpu"
    if topology == "local":
        devices = jax.devices()
        kind = devices[0].device_kind.lower()
        name = next((c for c in CHIPS if c in kind.replace(" ", "")), None)
        return devices, CHIPS.get(name) if name else None, name or kind
    chip = topology.split(":", 1)[0].lower()
    if chip not in CHIPS or ":" not in topology:
        raise ValueError(
            f"topology {topology!r}: use cpu:N, local, or CHIP:SHAPE with CHIP one of "
            f"{', '.join(c for c in CHIPS if c.startswith('v'))} (e.g. v5e:2x2, v5p:2x2x1)"
        )
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError(
            f"topology {topology}: compiling for TPU needs libtpu: pip install -e '.[tpu-plan]'"
        ) from None
    from jax.experimental import topologies

    # Compiling needs no chip: let several planners (pytest workers) load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    return list(desc.devices), CHIPS[chip], chip


# --------------------------------------------------------------------------------------------
# Programs


@dataclasses.dataclass
class Program:
    """A step to compile: the function, abstract state and batch, what it costs in model FLOPs
    and tokens, and how many tokens it decodes (for the memory term)."""

    name: str
    fn: Callable[[Any, Any], Any]
    state: Any
    batch: Any
    model_flops: float
    tokens: int
    decode_steps: int = 0
    donate: bool = True


def _abstract(fn: Callable[[], Any]) -> Any:
    return jax.eval_shape(fn)


def _spec_batch(shape: tuple[int, ...], dtype=jnp.int32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def model_config(spec: PlanSpec) -> models.TransformerConfig:
    """The preset of `spec.model` with the plan's numerics (dtype, remat, logits_chunk,
    scan_layers)."""
    probe = models.get_config(spec.model, **dict(spec.model_overrides))
    return models.get_config(
        spec.model,
        dtype=spec.dtype,
        remat=spec.remat,
        logits_chunk=spec.logits_chunk,
        scan_layers=spec.scan_layers,
        max_len=max(probe.max_len, spec.seq_len),
        **dict(spec.model_overrides),
    )


def _train_flops_per_token(cfg: models.TransformerConfig, spec: PlanSpec) -> float:
    """Model FLOPs of a trained token: forward + backward (6N + 12LTHDh); under LoRA the frozen
    weights get no gradient, so forward + the activations' gradient (4N + 8LTHDh; the adapters'
    own FLOPs, under 1 %, are left out)."""
    if spec.lora_rank:
        return 2.0 * cfg.flops_per_token(spec.seq_len, backward=False)
    return cfg.flops_per_token(spec.seq_len)


def programs(spec: PlanSpec) -> list[Program]:
    """The compiled programs of `spec`: its training step (for RL the whole iteration: sampling,
    scoring with a reward model, the update) and, for RL, the sampler alone."""
    cfg = model_config(spec)
    tx = train.make_optimizer(1e-5)
    lcfg = (
        lora_lib.LoraConfig(rank=spec.lora_rank, alpha=2.0 * spec.lora_rank)
        if spec.lora_rank
        else None
    )
    params = _abstract(lambda: models.init_params(cfg, jax.random.key(0)))

    def trained_and_base(tree):
        """(trained tree, frozen base or None) of a full tree under the plan's LoRA."""
        if lcfg is None:
            return tree, None
        adapters = jax.eval_shape(
            lambda p: lora_lib.init_adapters(p, lcfg, jax.random.key(1)), tree
        )
        base = tree
        if spec.quantize != "none":
            base = jax.eval_shape(lambda p: lora_lib.quantize_base(p, spec.quantize), tree)
        return adapters, base

    fpt_train = _train_flops_per_token(cfg, spec)
    fpt_fwd = cfg.flops_per_token(spec.seq_len, backward=False)
    b, t, k = spec.batch, spec.seq_len, spec.microbatches
    if spec.algo == "sft":
        model = models.Transformer(cfg) if lcfg is None else lora_lib.LoraTransformer(cfg, lcfg)
        loss = train.make_sft_loss(model)
        trained, base = trained_and_base(params)
        loss = loss if base is None else lora_lib.lora_loss(loss)
        frozen = None if base is None else {"base": base}
        state = jax.eval_shape(
            lambda tr, fr: train.create_train_state(tr, tx, 0, frozen=fr), trained, frozen
        )
        batch = {n: _spec_batch((b, t)) for n in ("tokens", "attention_mask", "loss_mask")}
        step = train.make_step(loss, tx, microbatches=k)
        return [Program("step", step, state, batch, b * t * fpt_train, b * t)]
    pairs = {f"{s}_{n}": _spec_batch((b, t)) for s in ("chosen", "rejected")
             for n in ("tokens", "attention_mask", "loss_mask")}  # fmt: skip
    if spec.algo == "reward":
        rm_params = _abstract(lambda: models.init_reward_params(cfg, jax.random.key(0)))
        if lcfg is None:
            rm, loss = models.RewardModel(cfg), None
            state = jax.eval_shape(lambda tr: train.create_train_state(tr, tx, 0), rm_params)
            loss = train.make_reward_loss(rm)
        else:
            adapters, base = trained_and_base(rm_params)
            rm = lora_lib.LoraRewardModel(cfg, lcfg)
            tr = lora_lib.trained(adapters, {"head": rm_params["head"]})
            trunk = {"transformer": base["transformer"]}
            state = jax.eval_shape(
                lambda tr, fr: train.create_train_state(tr, tx, 0, frozen=fr), tr, {"base": trunk}
            )
            loss = lora_lib.lora_loss(train.make_reward_loss(rm))
        step = train.make_step(loss, tx, microbatches=k)
        return [Program("step", step, state, pairs, 2 * b * t * fpt_train, 2 * b * t)]
    if spec.algo == "dpo":
        trained, base = trained_and_base(params)
        model = models.Transformer(cfg) if lcfg is None else lora_lib.LoraTransformer(cfg, lcfg)
        loss = train.make_dpo_loss(model, loss_type=spec.loss_type)
        hp = {"beta": 0.1}
        free = spec.loss_type in ("simpo", "orpo")  # reference-free: no reference at all
        if base is not None:
            loss, frozen = lora_lib.lora_loss(loss), {"base": base}
            if spec.ref == "precomputed" or free:
                frozen = {"base": base, "ref": None}
        else:
            frozen = params if spec.ref == "model" and not free else None
        state = jax.eval_shape(
            lambda tr, fr: train.create_train_state(tr, tx, 0, frozen=fr, hparams=hp),
            trained,
            frozen,
        )
        batch = dict(pairs)
        flops = 2 * b * t * fpt_train
        if spec.ref == "precomputed" and not free:
            batch.update({n: _spec_batch((b,), jnp.float32) for n in train.dpo.REFERENCE_KEYS})
        elif not free:
            flops += 2 * b * t * fpt_fwd
        step = train.make_step(loss, tx, microbatches=k)
        return [Program("step", step, state, batch, flops, 2 * b * t)]
    return _rl_programs(spec, cfg, tx, lcfg, params, trained_and_base)


def _rl_programs(spec, cfg, tx, lcfg, params, trained_and_base) -> list[Program]:
    n = spec.max_new_tokens
    p = spec.seq_len - n
    fpt_train = _train_flops_per_token(cfg, spec)
    prompts = {
        "prompt_tokens": _spec_batch((spec.batch, p)),
        "prompt_mask": _spec_batch((spec.batch, p)),
    }
    fpt_fwd = cfg.flops_per_token(spec.seq_len, backward=False)
    decode_fpt = cfg.flops_per_token(spec.seq_len, backward=False)  # an upper bound per new token
    rm_params = _abstract(lambda: models.init_reward_params(cfg, jax.random.key(0)))
    trained, base = trained_and_base(params)
    policy = models.Transformer(cfg) if lcfg is None else lora_lib.LoraTransformer(cfg, lcfg)
    rows = spec.batch if spec.algo == "ppo" else spec.batch * spec.group_size
    toks = rows * spec.seq_len
    if spec.algo == "ppo":
        value_full = _abstract(lambda: models.init_value_params(cfg, jax.random.key(2)))
        value_model = models.ValueModel(cfg)
        value = value_full
        if lcfg is not None:
            v_ad = jax.eval_shape(
                lambda v: lora_lib.init_adapters(v, lcfg, jax.random.key(3)), value_full
            )
            value = lora_lib.trained(v_ad, {"head": value_full["head"]})
            value_model = lora_lib.LoraValueModel(cfg, lcfg)
        ppo = train.PPOConfig(max_new_tokens=n, ppo_epochs=spec.ppo_epochs,
                              num_minibatches=spec.microbatches, eos_id=1)  # fmt: skip
        reward_fn = train.reward_model_fn(models.RewardModel(cfg))
        fns = train.make_ppo(policy, value_model, tx, tx, ppo, reward_fn=reward_fn)
        ref = params if base is None else base
        state = jax.eval_shape(
            lambda tr, v, r, rm: train.create_ppo_state(
                ppo, policy_params=tr, value_params=v, ref_params=r, policy_optimizer=tx,
                value_optimizer=tx, rng=0, reward_params=rm),
            trained, value, ref, rm_params,
        )  # fmt: skip
        # Sampling, then policy / reference / value / reward forwards, then the updates of
        # policy and critic.
        flops = rows * n * decode_fpt + 4 * toks * fpt_fwd + spec.ppo_epochs * 2 * toks * fpt_train
        step = fns.step
    else:
        cf = train.CriticFreeConfig(algo=spec.algo, group_size=spec.group_size, max_new_tokens=n,
                                    num_minibatches=spec.microbatches, eos_id=1)  # fmt: skip
        fns = train.make_critic_free(policy, tx, cf, reward_fn=models.RewardModel(cfg))
        state = jax.eval_shape(
            lambda tr, r, rm, bs: train.create_critic_free_state(
                tr, tx, 0, ref_params=r, reward_params=rm, base_params=bs, kl_coef=0.05),
            trained, params if base is None else None, rm_params, base,
        )  # fmt: skip
        flops = rows * n * decode_fpt + 3 * toks * fpt_fwd + toks * fpt_train
        step = fns.step
    policy_params = trained if base is None else lora_lib.view(trained, base)
    gen_state = {"params": policy_params}
    num_samples = 1 if spec.algo == "ppo" else spec.group_size

    def sample(state, batch):
        out = generate(
            policy,
            state["params"],
            batch["prompt_tokens"],
            batch["prompt_mask"],
            jax.random.key(0),
            max_new_tokens=n,
            eos_id=1,
            num_samples=num_samples,
        )
        return state, out

    return [
        Program("step", step, state, prompts, flops, toks, decode_steps=n),
        Program(
            "generate",
            sample,
            gen_state,
            prompts,
            rows * n * decode_fpt,
            rows * n,
            decode_steps=n,
            donate=False,
        ),  # fmt: skip
    ]


# --------------------------------------------------------------------------------------------
# Compile and report


def _param_bytes(tree: Any, mesh: Any) -> float:
    """Bytes per device of `tree` under the partition rules."""
    shardings = sh.state_shardings(mesh, tree)
    total = 0.0
    for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = s.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def compile_program(program: Program, mesh: Any) -> Any:
    """`program` compiled for `mesh` (state and batch sharded as the drivers shard them)."""
    return sh.compile_step(program.fn, mesh, program.state, program.batch,
                           donate_state=program.donate, batch_output=True)  # fmt: skip


def compile_or_oom(program: Program, mesh: Any) -> tuple[Any, str | None]:
    """(compiled program, None), or (None, the compiler's message) when the compiler itself
    refuses it for lack of memory (the TPU compiler checks its temporaries against HBM)."""
    try:
        return compile_program(program, mesh), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]


def oom_row(program: Program, mesh: Any, chip: Chip | None, message: str) -> dict[str, Any]:
    """The row of a program the compiler refused for memory: its arguments as the partition
    rules place them, the temporaries the message names, fits = False."""
    match = re.search(r"temporaries \(([\d.]+)G\)", message)
    args = _param_bytes(program.state, mesh) + _param_bytes(program.batch, mesh)
    row = {
        "program": program.name, "devices": mesh.devices.size, "args_gb": args / 1e9,
        "temp_gb": float(match.group(1)) * GIB / 1e9 if match else None, "out_gb": None,
        "alias_gb": None, "total_gb": None, "xla_tflop": None, "xla_gb_accessed": None,
        "model_tflop": program.model_flops / mesh.devices.size / 1e12,
        "tokens": program.tokens, "hbm_gb": None if chip is None else chip.hbm_bytes / 1e9,
        "fits": False, "roofline_ms": None, "tokens_per_s": None, "mfu": None, "error": message,
    }  # fmt: skip
    if row["temp_gb"] is not None:
        row["total_gb"] = row["args_gb"] + row["temp_gb"]
    return row


def analyse(program: Program, compiled: Any, mesh: Any, chip: Chip | None) -> dict[str, Any]:
    """One report row of a compiled program (see the module doc)."""
    mem = compiled.memory_analysis()
    n_dev = mesh.devices.size
    args, temp, out = (mem.argument_size_in_bytes, mem.temp_size_in_bytes,
                       mem.output_size_in_bytes)  # fmt: skip
    alias = getattr(mem, "alias_size_in_bytes", 0)
    total = args + temp + out - alias
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    xla_bytes = float(cost.get("bytes accessed", 0.0)) if cost else 0.0
    row: dict[str, Any] = {
        "program": program.name,
        "devices": n_dev,
        "args_gb": args / 1e9,
        "temp_gb": temp / 1e9,
        "out_gb": out / 1e9,
        "alias_gb": alias / 1e9,
        "total_gb": total / 1e9,
        "xla_tflop": xla_flops / 1e12,
        "xla_gb_accessed": xla_bytes / 1e9,
        "model_tflop": program.model_flops / n_dev / 1e12,
        "tokens": program.tokens,
        "hbm_gb": None,
        "fits": None,
        "roofline_ms": None,
        "tokens_per_s": None,
        "mfu": None,
    }
    if chip is not None:
        flops = max(xla_flops, program.model_flops / n_dev)
        weights = _param_bytes(program.state, mesh) if program.decode_steps else 0.0
        bytes_ = max(xla_bytes, xla_bytes + program.decode_steps * weights)
        seconds = max(flops / chip.peak_flops, bytes_ / chip.hbm_bandwidth)
        row.update(
            hbm_gb=chip.hbm_bytes / 1e9,
            fits=total <= chip.hbm_bytes,
            roofline_ms=1e3 * seconds,
            tokens_per_s=program.tokens / seconds,
            mfu=(program.model_flops / n_dev) / (seconds * chip.peak_flops),
        )
    return row


def plan(
    spec: PlanSpec, *, names: Sequence[str] | None = None, run_steps: int = 0
) -> list[dict[str, Any]]:
    """Compiles the programs of `spec` for its topology and mesh; one row each (`analyse`, or
    `oom_row` when the compiler refuses it), plus the spec's model, algo, topology, chip and
    mesh. With `run_steps` > 0 (the local devices) each compiled program also runs that many
    times on random inputs: measured_ms, measured_tokens_per_s, measured_mfu."""
    devices, chip, chip_name = topology_devices(spec.topology)
    mesh = sh.make_mesh(**sh.parse_mesh_spec(spec.mesh), devices=devices)
    vocab_size = model_config(spec).vocab_size
    rows = []
    for program in programs(spec):
        if names is not None and program.name not in names:
            continue
        compiled, oom = compile_or_oom(program, mesh)
        row = oom_row(program, mesh, chip, oom) if oom else analyse(program, compiled, mesh, chip)
        if run_steps and not oom:
            sec = time_program(program, compiled, mesh, vocab_size, steps=run_steps)
            flops = program.model_flops / len(devices)
            row.update(
                measured_ms=1e3 * sec,
                measured_tokens_per_s=program.tokens / sec,
                measured_mfu=None if chip is None else flops / sec / chip.peak_flops,
            )
        rows.append({"model": spec.model, "algo": spec.algo, "topology": spec.topology,
                     "chip": chip_name, "mesh": dict(mesh.shape), **row})  # fmt: skip
    return rows


def _concrete(tree: Any, vocab_size: int, seed: int = 0) -> Any:
    """Arrays for an abstract tree: token ids in [2, vocab), masks of ones, zeros elsewhere."""
    rng = jax.random.key(seed)

    def make(path, leaf):
        name = sh.path_str(path)
        if jnp.issubdtype(leaf.dtype, jnp.integer) and "mask" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if jnp.issubdtype(leaf.dtype, jnp.integer) and "tokens" in name:
            return jax.random.randint(rng, leaf.shape, 2, vocab_size, leaf.dtype)
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 1 and "opt_state" not in name:
            return 0.02 * jax.random.normal(
                jax.random.fold_in(rng, leaf.size), leaf.shape, leaf.dtype
            )
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(make, tree)


def time_program(
    program: Program, compiled: Any, mesh: Any, vocab_size: int, *, steps: int = 5
) -> float:
    """Seconds per call of `compiled` on real (random) inputs, the mean of `steps` calls after
    one warm-up call."""
    import time

    state = sh.shard_state(_concrete(program.state, vocab_size), mesh)
    batch = sh.shard_batch(jax.device_get(_concrete(program.batch, vocab_size, 1)), mesh)
    state, out = compiled(state, batch)
    jax.block_until_ready((state, out))
    start = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(state, batch)
    jax.block_until_ready((state, out))
    return (time.perf_counter() - start) / steps
