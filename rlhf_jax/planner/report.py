"""Compile a plan's programs for its target and report, per chip, memory against HBM, XLA's and
the model FLOPs and the roofline bound (`plan`); optionally run and time them (`time_program`)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import sharding as sh
from rlhf_jax.planner.programs import Program, model_config, programs
from rlhf_jax.planner.spec import GIB, Chip, PlanSpec, topology_devices


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
        state = _param_bytes(program.state, mesh)  # per chip, from the partition rules alone
        if chip is not None and state > chip.hbm_bytes:  # arithmetic: nothing to compile
            message = (
                f"the state alone (parameters, optimizer state, frozen copies) is "
                f"{state / 1e9:.1f} GB per chip, over the {chip.hbm_bytes / 1e9:.1f} GB of HBM: "
                "not compiled (more chips on fsdp/tensor, LoRA or QLoRA, or a precomputed "
                "reference would shrink it)"
            )
            rows.append({"model": spec.model, "algo": spec.algo, "topology": spec.topology,
                         "chip": chip_name, "mesh": dict(mesh.shape),
                         **oom_row(program, mesh, chip, message), "compiled": False})  # fmt: skip
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
