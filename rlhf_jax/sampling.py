"""Autoregressive sampling with a KV cache: one compiled program per shape, no host round trips.

`generate` prefills the LEFT-padded prompts in one forward pass, then runs a `lax.while_loop` over
new tokens against a preallocated `KVCache` (static shapes; the loop exits early once every row has
emitted `eos_id`). It is un-jitted and pure; jit it at the edge with `model`, `max_new_tokens`,
`top_k`, `eos_id`, `pad_id` and `num_samples` static (`temperature` and `top_p` may be traced), e.g.

    static = ("model", "max_new_tokens", "top_k", "eos_id", "pad_id", "num_samples")
    gen = jax.jit(generate, static_argnames=static)

Log-probabilities: `logps[b, i] = log softmax(logits / temperature)[token]`, the temperature-scaled
distribution BEFORE top-k / top-p truncation, which is exactly what a teacher-forced forward pass
gives with `losses.token_logps(logits / temperature, targets)`, so rollout and training log-probs
agree with no correction. (With top-k/top-p the tokens are drawn from the truncated, renormalised
distribution; its log-probs differ from `logps` by the log of the kept mass.) At temperature 0
(greedy) the logps are those of `log_softmax(logits)`.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from rlhf_jax.models.transformer import init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn, shared by evaluation, PPO rollouts and preference-pair sampling.

    Attributes:
      max_new_tokens: N, the completion length cap (>= 1).
      temperature: > 0 samples from softmax(logits / temperature); 0 is greedy.
      top_k: keep the k most likely tokens (>= 1), or None.
      top_p: keep the smallest nucleus of mass >= top_p (in (0, 1]), or None.

    `generate(model, params, tokens, mask, rng, **cfg.generate_kwargs(), eos_id=..., pad_id=...)`.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_k", self.top_k is None or self.top_k >= 1, ">= 1 (or None)"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "in (0, 1] (or None)"),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"sampling {name} must be {accepted}, got {getattr(self, name)!r}")

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `generate` this config sets."""
        return dataclasses.asdict(self)


class Generation(NamedTuple):
    """Output of `generate`: new tokens (pad after EOS), their log-probs (0 where mask is 0) and
    the mask (1 for generated tokens up to and including EOS)."""

    tokens: Int[Array, "B N"]
    logps: Float[Array, "B N"]
    mask: Int[Array, "B N"]


def _first_index(cond):
    """Index [B] of the first True along the last axis of cond [B, K] (K where none), as a plain
    min-reduction (XLA:CPU's variadic argmax reduction is several times slower)."""
    iota = jnp.arange(cond.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(cond, iota, cond.shape[-1]), axis=-1)


def _argmax(logits):
    """First index of the maximum of logits [B, K] (what jnp.argmax returns, faster on CPU)."""
    return _first_index(logits == jnp.max(logits, axis=-1, keepdims=True))


def _inverse_cdf_sample(u, logits):
    """One draw [B] from softmax(logits) [B, K] by inverting the CDF at u [B] ~ U[0, 1).

    Same distribution as `jax.random.categorical` (up to float rounding) from one uniform per row
    instead of K Gumbel variates (those cost ~40x more on CPU for a 50k vocabulary). Entries of
    zero probability (-inf logits) are never drawn. Also returns log sum exp(logits) [B].

    Two levels, so that no cumulative sum runs over all K entries (a [B, K] scan is the slowest
    part of a CPU decode step's sampling): the K probabilities are cut into blocks of G ≈ √K, the
    block of the draw is found on the cumulative block masses, then the entry inside that block.
    """
    b, k = logits.shape
    top = jnp.max(logits, axis=-1, keepdims=True)  # [B, 1]
    probs = jnp.exp(logits - top)  # [B, K], the max entry is exactly 1
    g = 1 << max(0, (max(k, 2) - 1).bit_length() + 1) // 2  # power of two ≥ √K
    nb = -(-k // g)
    blocks = jnp.pad(probs, ((0, 0), (0, nb * g - k))).reshape(b, nb, g)  # [B, NB, G]
    mass = jnp.sum(blocks, axis=-1)  # [B, NB]
    cum = jnp.cumsum(mass, axis=-1)  # [B, NB]
    total = cum[:, -1]  # [B]
    target = u * total  # [B]
    block = _first_index((cum > target[:, None]) & (mass > 0))  # [B]
    # Rounding can leave no hit when target lands on the total: take the last non-empty block.
    last = nb - 1 - _first_index(jnp.flip(mass, axis=-1) > 0)
    block = jnp.where(block < nb, block, last)
    inner = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [B, G]
    before = jnp.take_along_axis(
        cum - mass, block[:, None], axis=-1
    )  # [B, 1] mass of blocks before
    cdf = before + jnp.cumsum(inner, axis=-1)  # [B, G]
    entry = _first_index((cdf > target[:, None]) & (inner > 0))  # [B]
    # The same fallback inside the block (block and entry sums round differently).
    last_entry = g - 1 - _first_index(jnp.flip(inner, axis=-1) > 0)
    entry = jnp.where(entry < g, entry, last_entry)
    return block * g + entry, top[:, 0] + jnp.log(total)


def _truncated_sample(u, scaled, top_k, top_p):
    """Sample [B] from softmax(scaled) restricted to the top-k and then the top-p nucleus."""
    v = scaled.shape[-1]
    if top_k is not None:
        vals, idx = jax.lax.top_k(scaled, min(top_k, v))  # [B, k] sorted descending
    else:
        iota = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), scaled.shape)
        neg, idx = jax.lax.sort_key_val(-scaled, iota, dimension=-1)  # [B, V] descending
        vals = -neg
    if top_p is not None:
        probs = jax.nn.softmax(vals, axis=-1)  # [B, k] renormalised over the kept top-k
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
        # Keep the smallest prefix whose mass reaches top_p; the top token is always kept.
        keep = (mass_before < top_p) | (jnp.arange(vals.shape[-1]) == 0) | (top_p >= 1.0)
        vals = jnp.where(keep, vals, -jnp.inf)
    choice, _ = _inverse_cdf_sample(u, vals)  # [B] index into the sorted candidates
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]


def _next_token(u, logits, temperature, top_k, top_p):
    """(token [B], its log-prob [B] under log_softmax(logits / temperature), untruncated)."""

    def picked(x, token):
        return jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0]

    static_t = temperature if isinstance(temperature, int | float) else None
    if static_t is not None and static_t <= 0:  # greedy, decided at trace time
        token = _argmax(logits)
        return token, picked(logits, token) - jax.nn.logsumexp(logits, axis=-1)
    t = jnp.asarray(temperature, jnp.float32)
    greedy = t <= 0
    scaled = logits / jnp.where(greedy, 1.0, t)  # [B, V]
    if top_k is None and top_p is None:
        token, log_norm = _inverse_cdf_sample(u, scaled)
    else:
        token = _truncated_sample(u, scaled, top_k, top_p)
        log_norm = jax.nn.logsumexp(scaled, axis=-1)  # normaliser of the untruncated softmax
    if static_t is None:  # traced temperature: 0 still means greedy
        token = jnp.where(greedy, _argmax(logits), token)
    return token, picked(scaled, token) - log_norm


def generate(
    model,
    params,
    prompt_tokens: Int[ArrayLike, "B P"],
    prompt_mask: Shaped[ArrayLike, "B P"],
    rng: Array,
    *,
    max_new_tokens: int,
    temperature: float | Array = 1.0,
    top_k: int | None = None,
    top_p: float | Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    num_samples: int | None = None,
) -> Generation:
    """Sample `max_new_tokens` continuations of LEFT-padded prompts with a KV cache.

    With `num_samples=G` it draws G completions of every prompt in one call (the groups of
    GRPO / RLOO): each prompt is prefilled once, its cache copied G times, and the outputs have
    shape [P, G, N]; the draws are those of `generate` on the prompts each repeated G times
    (`jnp.repeat(prompts, G, axis=0)`, rows p * G + g) with the same `rng`.

    Step i draws from softmax(logits_i / temperature) truncated to the top-k tokens and then the
    top-p nucleus (Holtzman et al. 2020), or takes the argmax when temperature == 0; the draw of
    row b at step i inverts that distribution's CDF at `jax.random.uniform(rng, (N, B))[i, b]`.
    A row that emits `eos_id` keeps that token (mask 1) and is padded with `pad_id` (mask 0,
    logp 0) afterwards.

    Args:
      model: a `rlhf_jax.models.Transformer` (anything with its `config` and `decode` method).
      params: its params (the "params" collection).
      prompt_tokens: [B, P] int, left-padded; every row needs at least one real token.
      prompt_mask: [B, P] 1 on real prompt tokens.
      rng: PRNG key for sampling.
      max_new_tokens: N, static; P + N must not exceed the model's max_len.
      temperature: > 0 samples, 0 is greedy; may be traced.
      top_k, top_p: optional truncation (top_k static, top_p may be traced).
      eos_id, pad_id: static ints.
      num_samples: G completions per prompt (static), or None for one (outputs [B, N]).

    Returns:
      Generation(tokens [B, N] int32, logps [B, N] float32, mask [B, N] int32); [P, G, N] each
      with `num_samples=G`.
    """
    prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask).astype(bool)
    cfg = model.config
    b, p = prompt_tokens.shape
    n = max_new_tokens
    if n < 1 or p + n > cfg.max_len:
        raise ValueError(
            f"need 1 <= max_new_tokens and P + N <= max_len, got {p}+{n}>{cfg.max_len}"
        )
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (or None), got {num_samples}")
    variables = {"params": params}
    # The last sampled token is never fed back, so P + N - 1 slots suffice.
    cache = init_cache(cfg, b, p + n - 1)
    logits, cache = model.apply(
        variables, prompt_tokens, prompt_mask, cache, last_only=True, method="decode"
    )
    groups = num_samples or 1
    if groups > 1:  # one prefill per prompt, its cache and last logits copied to its G rows
        logits, cache = jax.tree.map(
            lambda x: x if x.ndim == 0 else jnp.repeat(x, groups, axis=0), (logits, cache)
        )
        b = b * groups

    # All randomness up front: one uniform per row and step (no RNG work inside the loop).
    uniforms = jax.random.uniform(rng, (n, b), jnp.float32)  # [N, B]

    def sample(i, logits, done):
        token, logp = _next_token(uniforms[i], logits[:, -1], temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token).astype(jnp.int32)  # [B]
        logp = jnp.where(done, 0.0, logp)  # [B]
        live = ~done  # [B] this token is part of the completion
        if eos_id is not None:
            done = done | (token == eos_id)
        return token, logp, live, done

    def write(out, i, col):
        return jax.lax.dynamic_update_slice(out, col[:, None].astype(out.dtype), (0, i))

    token, logp, live, done = sample(0, logits, jnp.zeros((b,), bool))
    tokens = write(jnp.full((b, n), pad_id, jnp.int32), 0, token)
    logps = write(jnp.zeros((b, n), jnp.float32), 0, logp)
    mask = write(jnp.zeros((b, n), jnp.int32), 0, live)

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, token, live, done, cache, tokens, logps, mask = carry
        logits, cache = model.apply(
            variables, token[:, None], live[:, None], cache, method="decode"
        )
        token, logp, live, done = sample(i, logits, done)
        tokens, logps, mask = write(tokens, i, token), write(logps, i, logp), write(mask, i, live)
        return i + 1, token, live, done, cache, tokens, logps, mask

    carry = (jnp.ones((), jnp.int32), token, live, done, cache, tokens, logps, mask)
    *_, tokens, logps, mask = jax.lax.while_loop(cond, body, carry)
    out = Generation(tokens=tokens, logps=logps, mask=mask)
    if num_samples is None:
        return out
    return jax.tree.map(lambda x: x.reshape(b // groups, groups, n), out)
