"""Reward and value models: the decoder (any family) with a linear head on its final hidden states.

The seed: the reward model is "initialized using the SFT model, but with an additional linear
layer over the final transformer layer to generate a scalar value as the reward". Both models
have params `{"transformer": <Transformer params>, "head": {"kernel": [D, 1], "bias": [1]}}`, so a
language-model checkpoint drops into "transformer" unchanged.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.transformer import Transformer, init_params


def _reward_head_std(config: TransformerConfig) -> float:
    # N(0, 1/sqrt(D + 1)) as in Ziegler et al. 2019 (lm-human-preferences) / Stiennon et al. 2020.
    return 1.0 / (config.d_model + 1) ** 0.5


def last_token_index(attention_mask: Shaped[ArrayLike, "B T"]) -> Array:
    """Index [B] of the last real token of each row (right- or left-padded); 0 for an empty row."""
    mask = jnp.asarray(attention_mask).astype(bool)
    t = mask.shape[1]
    return jnp.where(mask.any(axis=1), t - 1 - jnp.argmax(mask[:, ::-1], axis=1), 0)


class RewardModel(nn.Module):
    """Scalar reward r(x, y): `apply({"params": p}, tokens, attention_mask) -> scores[B]`, the head
    applied to the final hidden state of the last non-pad token of each row."""

    config: TransformerConfig

    def setup(self):
        init = nn.initializers.normal(_reward_head_std(self.config))
        self.transformer = Transformer(self.config)
        self.head = nn.Dense(1, kernel_init=init, param_dtype=jnp.float32, name="head")

    def __call__(
        self,
        tokens: Int[ArrayLike, "B T"],
        attention_mask: Shaped[ArrayLike, "B T"],
    ) -> Float[Array, " B"]:
        hidden = self.transformer.hidden(tokens, attention_mask)  # [B, T, D] float32
        last = last_token_index(attention_mask)  # [B]
        h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        return self.head(h_last)[:, 0]


class ValueModel(nn.Module):
    """Per-token values V(s_t) for the PPO critic: `apply({"params": p}, tokens, attention_mask)
    -> values[B, T]` (values at pad positions are meaningless; mask them)."""

    config: TransformerConfig

    def setup(self):
        self.transformer = Transformer(self.config)
        # Zero-initialised head: the critic starts at V = 0 everywhere.
        self.head = nn.Dense(1, kernel_init=nn.initializers.zeros, param_dtype=jnp.float32)

    def __call__(
        self,
        tokens: Int[ArrayLike, "B T"],
        attention_mask: Shaped[ArrayLike, "B T"],
    ) -> Float[Array, "B T"]:
        hidden = self.transformer.hidden(tokens, attention_mask)  # [B, T, D] float32
        return self.head(hidden)[..., 0]


def _with_head(config, rng, lm_params, head_kernel) -> dict:
    if lm_params is None:
        lm_params = init_params(config, rng)
    return {
        "transformer": jax.tree.map(jnp.asarray, lm_params),
        "head": {"kernel": head_kernel, "bias": jnp.zeros((1,), jnp.float32)},
    }


def init_reward_params(
    config: TransformerConfig, rng: Array, lm_params: dict | None = None
) -> dict:
    """RewardModel params: `lm_params` (or a random init) under "transformer", a fresh
    N(0, 1/sqrt(D+1)) head with zero bias."""
    rng_lm, rng_head = jax.random.split(rng)
    std = _reward_head_std(config)
    kernel = std * jax.random.normal(rng_head, (config.d_model, 1), jnp.float32)
    return _with_head(config, rng_lm, lm_params, kernel)


def init_value_params(config: TransformerConfig, rng: Array, lm_params: dict | None = None) -> dict:
    """ValueModel params: `lm_params` (or a random init) under "transformer", a zero head."""
    return _with_head(config, rng, lm_params, jnp.zeros((config.d_model, 1), jnp.float32))
