"""One decoder for every family (GPT-2, Llama, Mistral, Qwen 2/3, Gemma 2/3, GPT-NeoX), reward/value
heads and Hugging Face interop."""

from rlhf_jax.models.config import PRESETS, TransformerConfig, get_config
from rlhf_jax.models.heads import (
    RewardModel,
    ValueModel,
    init_reward_params,
    init_value_params,
    last_token_index,
)
from rlhf_jax.models.hf import config_from_pretrained, from_pretrained, save_pretrained
from rlhf_jax.models.transformer import KVCache, Transformer, init_cache, init_params

__all__ = [
    "PRESETS",
    "KVCache",
    "RewardModel",
    "Transformer",
    "TransformerConfig",
    "config_from_pretrained",
    "ValueModel",
    "from_pretrained",
    "get_config",
    "init_cache",
    "init_params",
    "init_reward_params",
    "init_value_params",
    "last_token_index",
    "save_pretrained",
]
