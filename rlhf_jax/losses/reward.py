"""The Bradley-Terry reward-model loss (seed Eq. 2)."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from rlhf_jax.losses._common import Scalar, f32


def bradley_terry_loss(
    chosen_rewards: Float[ArrayLike, " B"],
    rejected_rewards: Float[ArrayLike, " B"],
    *,
    margin: Scalar | Float[ArrayLike, " B"] = 0.0,
) -> Float[Array, " B"]:
    """Per-example Bradley-Terry negative log-likelihood of the observed preference.

    `L_b = -log sigmoid(r_c - r_r - margin)` (seed Eq. 2, from the BT model of Eq. 1; the margin
    is Llama 2's preference-strength margin, 0 gives plain BT).

    Args:
      chosen_rewards: [B] reward-model scores of the preferred responses.
      rejected_rewards: [B] scores of the dispreferred responses.
      margin: scalar or [B] margin subtracted from the reward difference.

    Returns:
      [B] float32 losses.
    """
    diff = f32(chosen_rewards) - f32(rejected_rewards)  # [B]
    # -log_sigmoid is softplus(-x): stable for large |x|.
    return -jax.nn.log_sigmoid(diff - jnp.asarray(margin, jnp.float32))
