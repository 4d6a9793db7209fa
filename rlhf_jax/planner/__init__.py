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

The parts: `planner.spec` (chips, `PlanSpec`, targets), `planner.programs` (every step and the
sampler from abstract inputs), `planner.report` (compile, analyse, time).
"""

from rlhf_jax.planner.programs import Program, model_config, programs
from rlhf_jax.planner.report import (
    analyse,
    compile_or_oom,
    compile_program,
    oom_row,
    plan,
    time_program,
)
from rlhf_jax.planner.spec import (
    ALGOS,
    CHIPS,
    CRITIC_FREE,
    GIB,
    REFERENCES,
    Chip,
    PlanSpec,
    topology_devices,
)

__all__ = [
    "ALGOS",
    "CHIPS",
    "CRITIC_FREE",
    "GIB",
    "REFERENCES",
    "Chip",
    "PlanSpec",
    "Program",
    "analyse",
    "compile_or_oom",
    "compile_program",
    "model_config",
    "oom_row",
    "plan",
    "programs",
    "time_program",
    "topology_devices",
]
