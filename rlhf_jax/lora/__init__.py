"""LoRA (Hu et al. 2021) on every model family: the adapters and their QLoRA base
(`lora.adapters`) and PEFT-format adapter folders in and out (`lora.peft`).

    lora_cfg = lora.LoraConfig(rank=16, alpha=32)
    adapters = lora.init_adapters(base_params, lora_cfg, rng)
    loss = lora.lora_loss(train.make_dpo_loss(lora.LoraTransformer(cfg, lora_cfg)))
    step = train.make_step(loss, tx)   # trains the adapters; the base is the reference
    lora.peft.save_peft(folder, cfg, adapters, lora_cfg)
"""

from rlhf_jax.lora.adapters import (
    ADAPTED,
    DEFAULT_TARGETS,
    QUANTIZE,
    TRAINED_KEYS,
    VIEW_KEYS,
    LoraConfig,
    LoraRewardModel,
    LoraTransformer,
    LoraValueModel,
    check_no_dropout,
    dequantize_base,
    init_adapters,
    lora_collection,
    lora_loss,
    merge,
    prepare,
    quantize_base,
    split_trained,
    target_modules,
    trained,
    view,
)

__all__ = [
    "ADAPTED",
    "DEFAULT_TARGETS",
    "QUANTIZE",
    "TRAINED_KEYS",
    "VIEW_KEYS",
    "LoraConfig",
    "LoraRewardModel",
    "LoraTransformer",
    "LoraValueModel",
    "check_no_dropout",
    "dequantize_base",
    "init_adapters",
    "lora_collection",
    "lora_loss",
    "merge",
    "prepare",
    "quantize_base",
    "split_trained",
    "target_modules",
    "trained",
    "view",
]
