"""What a plan targets: the chips' published figures (`CHIPS`), the plan's specification
(`PlanSpec`: model, method, batch, memory features, topology, mesh) and the devices of a
topology (`topology_devices`: a TPU topology from this CPU host through libtpu, N forced host
devices, or the local accelerators)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from rlhf_jax import train

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

CRITIC_FREE = tuple(train.ALGORITHMS)
ALGOS = ("sft", "reward", "dpo", "ppo") + CRITIC_FREE
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
    loss_type: str = "sigmoid"  # the DPO family's loss (simpo, orpo and cpo hold no reference)
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
        if self.lora_rank and self.ref == "model" and self.algo in ("dpo", "ppo", *CRITIC_FREE):
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
        if self.algo in ("ppo", *CRITIC_FREE) and self.max_new_tokens >= self.seq_len:
            raise ValueError(
                f"max_new_tokens {self.max_new_tokens} leaves no prompt in seq_len {self.seq_len}"
            )


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
