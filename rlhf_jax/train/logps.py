"""The log-probs a step takes of a model's own tokens, and the sequence helpers PPO and the
critic-free methods share.

    logps, hit, entropy = target_logps(model, params, tokens, mask)           # [B, T-1] each
    logps, ref_logps, kl = logps_and_exact_kl(model, params, ref, tokens, mask, start, n)

With the model's `config.logits_chunk` set (an int; None is off) the log-probs are computed
`logits_chunk` positions at a time from the final hidden states and the output layer
(`Transformer.hidden_and_output_weight`), each chunk's logits rematerialised in the backward pass,
so no [B, T, V] float32 logits tensor is ever held (`losses.chunked_target_logps`); on a mesh the
output layer stays split over the vocabulary (`sharding.vocab_parallel`). Without it they come from
the model's full logits. Both paths give the same numbers to float32 round-off.

`model` is a `models.Transformer` or a `lora.LoraTransformer` (params `{"base", "lora"}`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from rlhf_jax import losses
from rlhf_jax import sharding as sh


def chunk_options(config: Any, temperature: float = 1.0) -> dict[str, Any]:
    """The keyword arguments of the chunked log-prob functions (`losses.chunked_target_logps`,
    `losses.chunked_logps_and_exact_kl`) for a model of `config` (a `TransformerConfig` with
    `logits_chunk` set): its chunk, compute dtype, soft-cap, output-layer layout, and the output
    layer split over the vocabulary on a mesh (`sharding.vocab_parallel`)."""
    pin = functools.partial(
        sh.vocab_parallel, vocab_size=config.vocab_size, vocab_major=config.tie_embeddings
    )
    return dict(chunk=config.logits_chunk, dtype=config.compute_dtype,
                softcap=config.final_softcap, vocab_major=config.tie_embeddings,
                temperature=temperature, pin=pin)  # fmt: skip


def _window(tokens: jax.Array, start: int, length: int | None) -> tuple[slice, jax.Array]:
    """(the positions start .. start + n - 1, the [B, n] tokens they predict) of [B, T] rows."""
    t = tokens.shape[1]
    length = t - 1 - start if length is None else length
    if start < 0 or length < 1 or start + length > t - 1:
        raise ValueError(
            f"positions {start} .. {start + length - 1} are not inside the {t - 1} positions "
            f"that predict a token of a {t}-token row"
        )
    return slice(start, start + length), tokens[:, start + 1 : start + 1 + length]


def target_logps(
    model: nn.Module,
    params: Any,
    tokens: Int[ArrayLike, "B T"],
    mask: Shaped[ArrayLike, "B T"] | None = None,
    *,
    temperature: float = 1.0,
    start: int = 0,
    length: int | None = None,
) -> tuple[Float[Array, "B n"], Shaped[Array, "B n"], Float[Array, "B n"]]:
    """The teacher-forced log-probs of a sequence under softmax(logits / temperature).

    For positions t = start .. start + n - 1 (n = `length`, default all T - 1 positions):
    log pi(tokens[:, t+1] | tokens[:, :t+1]), whether that token is the argmax, and the entropy
    of pi(. | tokens[:, :t+1]). Chunked when `model.config.logits_chunk` is set (see the module).

    Args:
      model: a `Transformer` (or `LoraTransformer`).
      params: its params.
      tokens: [B, T] token ids; mask: [B, T] attention mask (None: every token is real).
      temperature: the logits are divided by it (> 0).
      start, length: the window of positions scored.
    Returns:
      ([B, n] float32 log-probs, [B, n] bool argmax hits, [B, n] float32 entropies).
    """
    tokens = jnp.asarray(tokens)
    window, targets = _window(tokens, start, length)  # targets [B, n]
    cfg = model.config
    variables = {"params": params}
    if cfg.logits_chunk is None:
        logits = model.apply(variables, tokens, attention_mask=mask)[:, window]  # [B, n, V]
        logits = logits / temperature
        hit = jnp.argmax(logits, axis=-1) == targets
        return losses.token_logps(logits, targets), hit, losses.entropy_from_logits(logits)
    hidden, weight = model.apply(variables, tokens, mask, method="hidden_and_output_weight")
    return losses.chunked_target_logps(
        hidden[:, window], weight, targets, **chunk_options(cfg, temperature)
    )


def logps_and_exact_kl(
    model: nn.Module,
    params: Any,
    ref_params: Any,
    tokens: Int[ArrayLike, "B T"],
    mask: Shaped[ArrayLike, "B T"],
    start: int,
    length: int,
    *,
    temperature: float = 1.0,
) -> tuple[Float[Array, "B n"], Float[Array, "B n"], Float[Array, "B n"]]:
    """The policy's (`params`) and the reference's (`ref_params`) log-probs of tokens
    start+1 .. start+n and the exact full-vocabulary KL(pi || pi_ref) at the positions that
    predict them (`losses.exact_kl`), all under softmax(logits / temperature): one forward of
    each. Chunked when `model.config.logits_chunk` is set (`losses.chunked_logps_and_exact_kl`:
    neither [B, n, V] logits tensor is held).

    Returns:
      ([B, n] policy log-probs, [B, n] reference log-probs, [B, n] exact KL), float32.
    """
    tokens = jnp.asarray(tokens)
    window, targets = _window(tokens, start, length)  # targets [B, n]
    cfg = model.config
    if cfg.logits_chunk is None:
        logits = model.apply({"params": params}, tokens, attention_mask=mask)[:, window]
        ref_logits = model.apply({"params": ref_params}, tokens, attention_mask=mask)[:, window]
        logits, ref_logits = logits / temperature, ref_logits / temperature  # [B, n, V]
        return (
            losses.token_logps(logits, targets),
            losses.token_logps(ref_logits, targets),
            losses.exact_kl(logits, ref_logits),
        )
    h, w = model.apply({"params": params}, tokens, mask, method="hidden_and_output_weight")
    rh, rw = model.apply({"params": ref_params}, tokens, mask, method="hidden_and_output_weight")
    return losses.chunked_logps_and_exact_kl(
        h[:, window], w, rh[:, window], rw, targets, **chunk_options(cfg, temperature)
    )


# ----------------------------------------------------------------------------------------------
# A rollout's rows: prompt [B, P] + response [B, N] as one [B, P+N] sequence.


def sequence(
    query_tokens: Int[ArrayLike, "B P"],
    query_mask: Shaped[ArrayLike, "B P"],
    response_tokens: Int[ArrayLike, "B N"],
    response_mask: Shaped[ArrayLike, "B N"],
) -> tuple[Int[Array, "B S"], Int[Array, "B S"]]:
    """(tokens [B, P+N], int32 mask [B, P+N]): the left-padded prompt followed by its response."""
    tokens = jnp.concatenate([query_tokens, response_tokens], axis=1)  # [B, P+N]
    mask = jnp.concatenate([query_mask, response_mask], axis=1).astype(jnp.int32)  # [B, P+N]
    return tokens, mask


def response_slice(x: jax.Array, p: int, n: int) -> jax.Array:
    """Outputs at positions P-1 .. P+N-2: those that predict/evaluate response tokens 0..N-1."""
    return x[:, p - 1 : p - 1 + n]


def response_logps_entropy(
    model: nn.Module,
    params: Any,
    tokens: Int[ArrayLike, "B S"],
    mask: Shaped[ArrayLike, "B S"],
    response_tokens: Int[ArrayLike, "B N"],
    p: int,
    temperature: float,
) -> tuple[Float[Array, "B N"], Float[Array, "B N"]]:
    """(log-probs [B, N], entropies [B, N]) of the N response tokens of `sequence(...)` rows whose
    prompts have P positions, under softmax(logits / temperature)."""
    n = response_tokens.shape[1]
    logps, _, entropy = target_logps(
        model, params, tokens, mask, temperature=temperature, start=p - 1, length=n
    )
    return logps, entropy


def masked_seq_sum(x: Float[ArrayLike, "B N"], mask: Shaped[ArrayLike, "B N"]) -> Array:
    """[B]: the sum of each row of `x` over the positions where `mask` > 0."""
    return jnp.sum(jnp.where(jnp.asarray(mask) > 0, x, 0.0), axis=-1)
