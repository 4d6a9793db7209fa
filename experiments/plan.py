"""Will it fit on the pod? Every step of an algorithm compiled ahead of time for a target, from
abstract inputs (nothing allocated), with a per-chip table of memory, fit and roofline speed.

    .venv/bin/python experiments/plan.py --model llama-3.1-8b --algo dpo --topology v5p:2x2x1 \\
        --batch 64 --seq-len 2048 --remat full --logits-chunk 512
    .venv/bin/python experiments/plan.py --model llama-3.1-8b --algo dpo --topology v5e:4x4 \\
        --lora-rank 16 --ref base --microbatches 4
    .venv/bin/python experiments/plan.py --model qwen2.5-7b --algo dpo --loss-type simpo
    .venv/bin/python experiments/plan.py --model gemma-2-9b --algo grpo --group-size 8 \\
        --topology v6e:4x4 --batch 32 --seq-len 1024 --max-new-tokens 512
    .venv/bin/python experiments/plan.py --model tiny --algo sft --topology local --run
    .venv/bin/python experiments/plan.py --model path/to/hf_folder --algo dpo --topology v5e:2x2

--topology is a TPU slice CHIP:SHAPE (v4, v5e, v5p, v6e; e.g. v5e:2x2, v5p:4x4x4; compiled from
this host through libtpu: `pip install -e '.[tpu-plan]'`), `cpu:N` (N host devices; the flag
XLA_FLAGS=--xla_force_host_platform_device_count=N is set for you when JAX has not started), or
`local` (this machine's devices; with --run the step also runs on random weights and the
measured time is printed beside the estimate). --mesh splits the devices as the drivers do
(data=D,fsdp=F,tensor=T; -1 fills). --algo is sft, reward, dpo, ppo or a critic-free method
(grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp); --batch counts sequences (SFT), pairs (reward,
DPO) or prompts (RL, each sampled --group-size times by the critic-free methods); --seq-len is
the tokens per sequence (RL: the prompt plus --max-new-tokens); --loss-type picks the DPO family's
loss (simpo, orpo and cpo hold no reference).

Memory features: --remat {none,full,dots} on the decoder blocks, --microbatches K (gradient
accumulation inside the step; RL: K minibatches), --logits-chunk C (log-probs over the
vocabulary C positions at a time: no [B, T, V] logits), --scan-layers (the blocks as one
lax.scan over the layers: one layer's gathered weights live at a time, and compiling takes the
same time at any depth), --lora-rank R with --quantize
{none,int8,nf4}, and --ref {model,precomputed,base} (a frozen copy, DPO's precomputed
log-probs, or the LoRA base).

One row per compiled program (the step; for RL also the sampler alone): per-chip argument,
temporary and output bytes and their total against the chip's HBM, fits, XLA's FLOPs and bytes,
the model FLOPs, the roofline step time and the tokens/s and MFU it implies as upper bounds
(`rlhf_jax.planner`). --out writes the rows as JSON. --model is a preset or a Hugging Face folder
(its config.json is read; no weights). A program whose parameters and optimizer state alone
(as the partition rules place them) exceed a chip's HBM is reported at once, not compiled.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # cpu:N needs N host devices before JAX starts
    for i, arg in enumerate(sys.argv):
        value = arg.split("=", 1)[1] if arg.startswith("--topology=") else None
        if arg == "--topology" and i + 1 < len(sys.argv):
            value = sys.argv[i + 1]
        if value and value.startswith("cpu:") and "jax" not in sys.modules:
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = (
                    f"{flags} --xla_force_host_platform_device_count={value[4:]}".strip()
                )
            os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402
import json  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Literal  # noqa: E402

from rlhf_jax import paths, planner
from rlhf_jax import sharding as sh  # noqa: E402
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import checks, cli


@dataclasses.dataclass(frozen=True)
class Config:
    """Compile an algorithm's steps for a target and print their per-chip memory and speed."""

    model: str = "llama-3.2-1b"  # a preset of rlhf_jax.models.get_config, or an HF folder
    algo: str = "dpo"  # sft, reward, dpo, ppo, grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp
    topology: str = "cpu:8"  # CHIP:SHAPE (v5e:2x2, v5p:4x4x4, ...), cpu:N or local
    mesh: str = "data=1,fsdp=-1"  # data=D,fsdp=F,tensor=T (-1: the remaining devices)
    batch: int = 8  # global: sequences (sft), pairs (reward, dpo), prompts (RL)
    seq_len: int = 1024  # tokens per sequence (RL: prompt + max_new_tokens)
    lora_rank: int = 0  # LoRA adapters of this rank (0: full fine-tuning)
    quantize: Literal["none", "int8", "nf4"] = "none"  # QLoRA's base
    remat: Literal["none", "full", "dots"] = "full"  # rematerialisation of the decoder blocks
    microbatches: int = 1  # gradient accumulation inside the step (RL: minibatches)
    ref: Literal["model", "precomputed", "base"] = "model"  # the reference policy's form
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "cpo"] = "sigmoid"
    logits_chunk: int | None = None  # positions per log-prob chunk (None: the whole [B, T, V])
    scan_layers: bool = False  # the decoder blocks as one lax.scan over the layers
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # compute dtype (params stay float32)
    max_new_tokens: int = 256  # RL: tokens sampled per prompt
    group_size: int = 8  # critic-free: completions per prompt
    ppo_epochs: int = 1  # RL: passes over each rollout
    run: bool = False  # with --topology local: also run the step and time it
    run_steps: int = 5  # timed calls with --run
    out: str | None = None  # write the rows as JSON here


def _spec(config: Config) -> planner.PlanSpec:
    names = {f.name for f in dataclasses.fields(planner.PlanSpec)}
    try:
        return planner.PlanSpec(
            **{k: v for k, v in dataclasses.asdict(config).items() if k in names}
        )
    except ValueError as e:
        raise ConfigError(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}") from None


def _fmt(x, spec=".2f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return format(x, spec)


def print_table(rows: list[dict]) -> None:
    """The rows as an aligned table (one per program)."""
    head = ("program", "args GB", "temp GB", "out GB", "total GB", "HBM GB", "fits",
            "XLA TFLOP", "XLA GB", "model TFLOP", "roofline ms", "tokens/s", "MFU")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append((
            r["program"], _fmt(r["args_gb"], ".3g"), _fmt(r["temp_gb"], ".3g"),
            _fmt(r["out_gb"], ".3g"), _fmt(r["total_gb"], ".3g"), _fmt(r["hbm_gb"], ".1f"),
            _fmt(r["fits"]),
            _fmt(r["xla_tflop"], ".3f"), _fmt(r["xla_gb_accessed"], ".1f"),
            _fmt(r["model_tflop"], ".3f"), _fmt(r["roofline_ms"], ".1f"),
            _fmt(r["tokens_per_s"], ".0f"),
            "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%",
        ))  # fmt: skip
        if "measured_ms" in r:
            mfu = r["measured_mfu"]
            lines.append((
                f"  measured ({r['program']})", *([""] * 9), _fmt(r["measured_ms"], ".1f"),
                _fmt(r["measured_tokens_per_s"], ".0f"),
                "n/a" if mfu is None else f"{100 * mfu:.0f}%",
            ))  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(line, widths))))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the command line `argv`; returns the rows."""
    config = cli.parse_config(Config, {"default": Config()}, argv, description=__doc__)
    checks.validate(config)
    spec = _spec(config)
    if config.run and config.topology != "local":
        raise ConfigError(f"--run times real steps: use --topology local, not {config.topology}")
    try:
        devices, chip, chip_name = planner.topology_devices(config.topology)
        mesh = sh.make_mesh(**sh.parse_mesh_spec(config.mesh), devices=devices)
    except ValueError as e:
        raise ConfigError(f"--topology/--mesh: {e}") from None
    try:  # an unknown preset, a folder without config.json, an unsupported model_type
        cfg = planner.model_config(spec)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"--model {config.model}: {e.args[0] if e.args else e}") from None
    print(
        f"{config.model} ({cfg.num_params() / 1e9:.2f}B params) {config.algo} on "
        f"{config.topology} ({chip_name}, {len(devices)} devices), mesh {dict(mesh.shape)}, "
        f"batch {config.batch} x {config.seq_len} tokens, remat {config.remat}, "
        f"microbatches {config.microbatches}, logits chunk {config.logits_chunk or 'off'}, "
        f"scan layers {'on' if config.scan_layers else 'off'}, "
        f"LoRA {config.lora_rank or 'off'} ({config.quantize}), ref {spec.ref}"
    )
    run_steps = config.run_steps if config.run else 0
    rows = []
    for row in planner.plan(spec, run_steps=run_steps):
        if row.get("error"):
            what = (
                "does not fit" if row.get("compiled") is False else "the compiler ran out of memory"
            )
            print(f"{row['program']}: {what}: {row['error']}")
        rows.append({**row, **dataclasses.asdict(config), "mesh_shape": row["mesh"]})
    print_table(rows)
    if chip is not None:
        print(
            f"peak {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, HBM {chip.hbm_bandwidth / 1e9:.0f} "
            f"GB/s per chip ({chip.source}); roofline = max(FLOPs / peak, bytes / bandwidth)"
        )
    print(
        "XLA TFLOP: what the compiler counts per chip (a scanned loop's body once, so less than "
        "the work with --scan-layers); model TFLOP: 6N + attention per trained token (2N per "
        "sampled one). The roofline takes the larger, and tokens/s and MFU are upper bounds from "
        "it: MFU = model FLOPs / (roofline time x peak), so when the model FLOPs set the roofline "
        "it reads 100 %, a bound, not a measurement (--topology local --run measures)."
    )
    if config.out:
        paths.write_text_atomic(config.out, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    cli.run_cli(main)
