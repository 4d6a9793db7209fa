"""Token log-probabilities, sequence log-probabilities, the SFT loss and entropy.

Masks are 0/1 arrays of any numeric or bool dtype (the masked reductions every loss module
shares are in `losses._common`).

Shape strings of one letter are written with a leading space (`" B"`) so that linters do not read
them as forward references; jaxtyping ignores the space.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from rlhf_jax.losses._common import f32, masked_mean, masked_sum


def token_logps(
    logits: Float[ArrayLike, "B T V"], targets: Int[ArrayLike, "B T"]
) -> Float[Array, "B T"]:
    """Log-probability of each target token under softmax(logits), in float32.

    `log softmax(logits[b, t])[targets[b, t]]`; the caller has already shifted (targets are the
    tokens that `logits[:, t]` predicts, e.g. `token_logps(logits[:, :-1], tokens[:, 1:])`).

    Args:
      logits: [B, T, V] unnormalized scores (any float dtype; upcast to float32).
      targets: [B, T] token ids in [0, V).

    Returns:
      [B, T] float32 log-probabilities.
    """
    logits = f32(logits)  # log-softmax in float32 even for bf16 activations
    picked = jnp.take_along_axis(logits, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[
        ..., 0
    ]
    return picked - jax.nn.logsumexp(logits, axis=-1)  # [B, T]


def chunked_target_logps(
    hidden: Float[ArrayLike, "B T D"],
    weight: Float[ArrayLike, "_ _"],
    targets: Int[ArrayLike, "B T"],
    *,
    chunk: int,
    dtype: Any = jnp.float32,
    softcap: float | None = None,
    vocab_major: bool = False,
    temperature: float = 1.0,
    pin: Callable[[str, Array], Array] | None = None,
) -> tuple[Float[Array, "B T"], Shaped[Array, "B T"], Float[Array, "B T"]]:
    """`token_logps(logits, targets)`, `argmax(logits) == targets` and
    `entropy_from_logits(logits)` for `logits = hidden @ weight` (float32 accumulation in
    `dtype`, then `cap * tanh(logits / cap)` with `softcap`, then `/ temperature`) without ever
    holding the [B, T, V] logits: a `lax.scan` over chunks of `chunk` positions whose body is
    rematerialised, so the backward pass recomputes one chunk's logits at a time.

    Args:
      hidden: [B, T, D] final hidden states (already aligned with `targets`).
      weight: the output layer, [D, V] (an LM head kernel) or, with `vocab_major`, [V, D] (a tied
        embedding).
      targets: [B, T] token ids in [0, V).
      chunk: positions per chunk (>= 1; T is padded up to a multiple of it).
      pin: optional `pin(kind, x) -> x` applied inside each chunk to the weight (kind
        "weight") and the chunk's logits ("logits", [B, c, V]): where a sharded caller places
        them (the models pass `sharding.vocab_parallel`); the values are unchanged.
    Returns:
      ([B, T] float32 log-probabilities, [B, T] bool: the target is the argmax, [B, T] float32
      entropies).
    """
    pin = pin or (lambda kind, x: x)
    logits_of = functools.partial(
        chunk_logits, dtype=dtype, softcap=softcap, vocab_major=vocab_major,
        temperature=temperature, pin=pin,
    )  # fmt: skip

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(h_i, y_i):
        logits = logits_of(h_i, weight)  # [B, c, V]
        hit = jnp.argmax(logits, axis=-1) == y_i
        return picked_logps(logits, y_i), hit, entropy_from_logits(logits)

    return scan_chunks(one, (jnp.asarray(hidden), jnp.asarray(targets, jnp.int32)), chunk)


def chunk_logits(
    h: Float[ArrayLike, "B c D"],
    weight: Float[ArrayLike, "_ _"],
    *,
    dtype: Any,
    softcap: float | None,
    vocab_major: bool,
    temperature: float,
    pin: Callable[[str, Array], Array],
) -> Float[Array, "B c V"]:
    """One chunk's logits for the chunked functions: `h @ weight` accumulated in float32 from
    `dtype` operands (`pin`ned as `chunked_target_logps` says), soft-capped, / temperature."""
    spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
    w = pin("weight", weight)
    logits = jnp.einsum(
        spec, jnp.asarray(h).astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
    )
    logits = pin("logits", logits)  # [B, c, V]
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits / temperature


def picked_logps(
    logits: Float[ArrayLike, "B c V"], y: Int[ArrayLike, "B c"]
) -> Float[Array, "B c"]:
    """`token_logps` as a masked sum, not a gather: the vocabulary may be split across chips."""
    onehot = jnp.arange(logits.shape[-1]) == jnp.asarray(y)[..., None]
    picked = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    return picked - jax.nn.logsumexp(logits, axis=-1)


def scan_chunks(one: Callable[..., Any], xs: tuple[Array, ...], chunk: int) -> Any:
    """`one(*[x[:, chunk i] for x in xs])` for each chunk of `chunk` positions (dim 1 of every
    [B, T, ...] array in `xs`, padded up to a multiple of `chunk`) in a `lax.scan`; its [B, c]
    outputs concatenated back to [B, T]."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, t = xs[0].shape[:2]
    n = -(-t // chunk)

    def split(x):
        x = jnp.pad(x, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)  # [n, B, c, ...]

    _, outs = jax.lax.scan(lambda c, x: (c, one(*x)), None, tuple(split(x) for x in xs))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t], outs)


def sequence_logps(
    token_logps: Float[ArrayLike, "B T"], mask: Shaped[ArrayLike, "B T"], *, average: bool = False
) -> Float[Array, " B"]:
    """Log-probability of each sequence: masked sum (or mean) of its token log-probs.

    `log pi(y|x) = sum_t mask[b, t] * token_logps[b, t]`; with `average=True` divided by
    `max(sum_t mask[b, t], 1)` (the length-normalized log-prob of SimPO/ORPO/IPO).

    Args:
      token_logps: [B, T] per-token log-probs.
      mask: [B, T] 0/1 (any dtype), 1 on the response tokens.
      average: mean over masked tokens instead of the sum.

    Returns:
      [B] float32; 0 for a row with no masked token.
    """
    token_logps = f32(token_logps)
    if average:
        return masked_mean(token_logps, mask, axis=-1)
    return masked_sum(token_logps, mask, axis=-1)


def sft_loss(
    logits: Float[ArrayLike, "B T V"],
    targets: Int[ArrayLike, "B T"],
    mask: Shaped[ArrayLike, "B T"],
) -> Float[Array, " B"]:
    """Per-example mean negative log-likelihood of the masked target tokens (SFT, seed "SFT").

    `L_b = -sum_t m[b,t] log pi(targets[b,t] | .) / max(sum_t m[b,t], 1)`.

    Args:
      logits: [B, T, V] (already aligned with targets).
      targets: [B, T] token ids.
      mask: [B, T] 0/1 (any dtype), 1 on the tokens to learn.

    Returns:
      [B] float32; 0 for a row with no masked token.
    """
    return -sequence_logps(token_logps(logits, targets), mask, average=True)


def entropy_from_logits(logits: Float[ArrayLike, "B T V"]) -> Float[Array, "B T"]:
    """Entropy of softmax(logits) at each position, in float32.

    `H[b, t] = -sum_v p_v log p_v`, `p = softmax(logits[b, t])`; terms with p_v = 0 count 0.

    Args:
      logits: [B, T, V] unnormalized scores (-inf allowed for excluded tokens).

    Returns:
      [B, T] float32 entropies (nats).
    """
    logp = jax.nn.log_softmax(f32(logits), axis=-1)  # [B, T, V]
    p = jnp.exp(logp)  # [B, T, V]
    # 0 * log 0 := 0; the where keeps -inf logits from producing NaN values or gradients.
    return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)
