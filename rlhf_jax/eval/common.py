"""Shared pieces of evaluation: statistics, sequence KL, the compiled sampling programs run in
chunks, decoding and scoring (text or token rewards).

Sequence layout of every forward (as in `train.ppo`): `[prompt (left-padded, P)][completion (N,
pad after EOS)]` with mask `[prompt_mask][completion_mask]`; the logits that score completion
token i sit at position P - 1 + i. KL and log-probs are those of softmax(logits / temperature),
the distribution sampled from (at temperature 0, greedy, those of temperature 1, as in
`sampling.generate`).
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Real, Shaped

from rlhf_jax import losses
from rlhf_jax.chunking import chunk_rows
from rlhf_jax.sampling import SamplingConfig, generate

TextReward = Callable[[list[str]], Any]  # texts [B] -> scores [B] (host; e.g. VADER)
TokenReward = Callable[[np.ndarray, np.ndarray], Any]  # (tokens [B, T], mask [B, T]) -> [B]


# ---------------------------------------------------------------------------------------------
# Pure helpers.


def mean_and_stderr(x: Real[ArrayLike, " B"]) -> tuple[float, float]:
    """Mean over prompts and its standard error `std(x, ddof=1) / sqrt(B)` (NaN when B = 1).

    Args:
      x: [B] per-prompt values (B >= 1).

    Returns:
      (mean, stderr) as Python floats, computed in float64.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    stderr = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(np.mean(x)), stderr


def masked_sequence_sum(
    x: Float[ArrayLike, "B T"], mask: Shaped[ArrayLike, "B T"]
) -> Float[Array, " B"]:
    """`sum_t mask[b, t] * x[b, t]` per row, in float32 (where-select: masked NaN/inf never leak).

    Args:
      x: [B, T] per-token values.
      mask: [B, T] 0/1 (any dtype), 1 on the tokens to sum.

    Returns:
      [B] float32.
    """
    keep = jnp.asarray(mask) != 0  # [B, T]
    return jnp.sum(jnp.where(keep, jnp.asarray(x, jnp.float32), 0.0), axis=-1)


class SequenceKL(NamedTuple):
    """Sequence-level KL(π ‖ π_ref) of sampled completions: exact and the k1/k3 estimates [B], and
    the per-token log-probs of the sampled tokens under both policies [B, N] (0 where masked)."""

    exact: Float[Array, " B"]
    k1: Float[Array, " B"]
    k3: Float[Array, " B"]
    logps: Float[Array, "B N"]
    ref_logps: Float[Array, "B N"]


def sequence_kl(
    logits: Float[ArrayLike, "B N V"],
    ref_logits: Float[ArrayLike, "B N V"],
    tokens: Int[ArrayLike, "B N"],
    mask: Shaped[ArrayLike, "B N"],
) -> SequenceKL:
    """KL(π(·|x) ‖ π_ref(·|x)) of completions y ~ π, summed over their tokens (seed Eq. 3's KL).

    By the chain rule, `KL_seq = E_y[sum_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t))]`, so the sum of
    exact per-token KLs along a sampled y is an unbiased, low-variance estimate of the sequence KL;
    `sum_t k1_t` and `sum_t k3_t` (Schulman 2020) estimate the same number from the sampled
    tokens' log-probs alone.

    Args:
      logits: [B, N, V] policy logits at the positions that predict the completion tokens (already
        divided by the sampling temperature).
      ref_logits: [B, N, V] reference logits at the same positions (same temperature).
      tokens: [B, N] completion tokens.
      mask: [B, N] 1 on completion tokens (up to and including EOS).

    Returns:
      SequenceKL(exact [B], k1 [B], k3 [B], logps [B, N], ref_logps [B, N]).
    """
    keep = jnp.asarray(mask) != 0  # [B, N]
    logps = jnp.where(keep, losses.token_logps(logits, tokens), 0.0)  # [B, N]
    ref_logps = jnp.where(keep, losses.token_logps(ref_logits, tokens), 0.0)  # [B, N]
    return SequenceKL(
        exact=masked_sequence_sum(losses.exact_kl(logits, ref_logits), keep),
        k1=masked_sequence_sum(losses.kl_estimate(logps, ref_logps, estimator="k1"), keep),
        k3=masked_sequence_sum(losses.kl_estimate(logps, ref_logps, estimator="k3"), keep),
        logps=logps,
        ref_logps=ref_logps,
    )


def _response_logits(model, params, prompt_tokens, prompt_mask, tokens, mask):
    """Teacher-forced logits [B, N, V] that score the completion tokens (one forward of
    prompt + completion; the output layer runs on the N completion positions only)."""
    p, n = prompt_tokens.shape[1], tokens.shape[1]
    seq = jnp.concatenate([prompt_tokens, tokens], axis=1)  # [B, P+N]
    seq_mask = jnp.concatenate([prompt_mask, mask], axis=1).astype(jnp.int32)  # [B, P+N]
    variables = {"params": params}
    hidden = model.apply(variables, seq, seq_mask, method="hidden")  # [B, P+N, D]
    return model.apply(variables, hidden[:, p - 1 : p - 1 + n], method="logits")  # [B, N, V]


# ---------------------------------------------------------------------------------------------
# Compiled programs (one per static configuration; jit adds one executable per shape).


def sampling_static(sampling: SamplingConfig, eos_id: int | None, pad_id: int) -> tuple:
    """The settings a compiled program is specialised on (the temperature is traced)."""
    return (sampling.max_new_tokens, eos_id, pad_id, sampling.top_k, sampling.top_p)


def _sampler(model, max_new_tokens, eos_id, pad_id, top_k, top_p):
    """`generate` with the static settings bound: (params, tokens, mask, rng, temperature=)."""
    return functools.partial(
        generate, model, max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p,
        eos_id=eos_id, pad_id=pad_id,
    )  # fmt: skip


@functools.lru_cache(maxsize=32)
def reward_kl_program(model, *static):
    sample = _sampler(model, *static)

    def run(policy_params, ref_params, prompt_tokens, prompt_mask, rng, temperature):
        gen = sample(policy_params, prompt_tokens, prompt_mask, rng, temperature=temperature)
        scale = jnp.where(temperature > 0, temperature, 1.0)  # greedy: temperature-1 logits
        args = (prompt_tokens, prompt_mask, gen.tokens, gen.mask)
        logits = _response_logits(model, policy_params, *args) / scale  # [B, N, V]
        ref_logits = _response_logits(model, ref_params, *args) / scale  # [B, N, V]
        kl = sequence_kl(logits, ref_logits, gen.tokens, gen.mask)
        return {
            "tokens": gen.tokens,
            "mask": gen.mask,
            "kl": kl.exact,
            "kl_k1": kl.k1,
            "kl_k3": kl.k3,
            "logps": kl.logps,
            "ref_logps": kl.ref_logps,
        }

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _generate_program(model, *static):
    sample = _sampler(model, *static)

    def run(params, prompt_tokens, prompt_mask, rng, temperature):
        gen = sample(params, prompt_tokens, prompt_mask, rng, temperature=temperature)
        return {"tokens": gen.tokens, "mask": gen.mask, "logps": gen.logps}

    return jax.jit(run)


def in_chunks(program, params, prompt_tokens, prompt_mask, rng, temperature, batch_size):
    """Runs `program(*params, tokens, mask, key_i, temperature)` on chunks of `batch_size` rows
    (`chunking.chunk_rows`; key_i = fold_in(rng, i), also for a single chunk, so the first rows
    do not depend on B) and returns the concatenated NumPy outputs."""
    temperature = jnp.asarray(temperature, jnp.float32)
    pending = [  # dispatched asynchronously, then gathered
        (real, program(*params, prompt_tokens[idx], prompt_mask[idx], jax.random.fold_in(rng, i),
                       temperature))
        for i, (idx, real) in enumerate(chunk_rows(prompt_tokens.shape[0], batch_size))
    ]  # fmt: skip
    chunks = [{k: np.asarray(v)[:real] for k, v in out.items()} for real, out in pending]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def sample_completions(
    model,
    params,
    prompt_batch: Mapping[str, Any],
    rng: Array,
    *,
    sampling: SamplingConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Completions of LEFT-padded prompts, sampled by one compiled `sampling.generate` program
    run over chunks of `batch_size` rows (chunk i with key fold_in(rng, i)).

    Returns:
      {"tokens": [B, N] int32, "mask": [B, N] int32, "logps": [B, N] float32} (NumPy).
    """
    prompt_tokens, prompt_mask = prompt_arrays(prompt_batch)
    program = _generate_program(model, *sampling_static(sampling, eos_id, pad_id))
    out = in_chunks(
        program, (params,), prompt_tokens, prompt_mask, rng, sampling.temperature, batch_size
    )
    return {
        "tokens": out["tokens"].astype(np.int32),
        "mask": out["mask"].astype(np.int32),
        "logps": out["logps"],
    }


def prompt_arrays(prompt_batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(prompt_batch["prompt_tokens"], np.int32)
    mask = np.asarray(prompt_batch["prompt_mask"]).astype(np.int32)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(
            f"prompt_tokens/prompt_mask must be [B, P], got {tokens.shape}, {mask.shape}"
        )
    return tokens, mask


def _id_lists(tokens: np.ndarray, mask: np.ndarray, drop_id: int | None) -> list[list[int]]:
    keep = (mask > 0) & (tokens != drop_id) if drop_id is not None else mask > 0
    return [t[k].tolist() for t, k in zip(tokens, keep)]


def decode_texts(tokenizer, prompt_tokens, prompt_mask, tokens, mask, eos_id):
    """(texts = decoded prompt + completion, completions = decoded completion), EOS dropped."""
    prompt_ids = _id_lists(prompt_tokens, prompt_mask, None)
    completion_ids = _id_lists(tokens, mask, eos_id)
    texts = tokenizer.decode_batch([p + c for p, c in zip(prompt_ids, completion_ids)])
    return list(texts), list(tokenizer.decode_batch(completion_ids))


def score_completions(
    reward_fn, token_reward_fn, texts, prompt_tokens, prompt_mask, tokens, mask, what
):
    if (reward_fn is None) == (token_reward_fn is None):
        raise ValueError(f"pass exactly one of {what} (texts) and its token-level version")
    if reward_fn is not None:
        if texts is None:
            raise ValueError("a text reward needs `tokenizer` to decode the completions")
        scores = reward_fn(texts)
    else:
        seq = np.concatenate([prompt_tokens, tokens], axis=1)  # [B, P+N]
        seq_mask = np.concatenate([prompt_mask, mask], axis=1).astype(np.int32)  # [B, P+N]
        scores = token_reward_fn(seq, seq_mask)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if scores.shape[0] != tokens.shape[0]:
        raise ValueError(f"the reward returned {scores.shape[0]} scores for {tokens.shape[0]} rows")
    return scores


def reward_model_score_fn(
    reward_model, reward_params, *, batch_size: int | None = None
) -> TokenReward:
    """A jitted token-level reward `(tokens [B, T], mask [B, T]) -> scores [B]` (NumPy) from a
    `models.RewardModel` and its params, for `token_reward_fn=` / `score_fn=` below; rows go
    through in chunks of `batch_size` (the last one padded, so one shape compiles)."""
    apply = _jitted_apply(reward_model)

    def score(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        pending = [
            (real, apply(reward_params, tokens[idx], mask[idx]))
            for idx, real in chunk_rows(tokens.shape[0], batch_size)
        ]
        return np.concatenate([np.asarray(out)[:real] for real, out in pending])

    return score


@functools.lru_cache(maxsize=16)
def _jitted_apply(model):
    return jax.jit(lambda params, tokens, mask: model.apply({"params": params}, tokens, mask))
