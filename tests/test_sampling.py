"""Tests of rlhf_jax.sampling.generate against teacher-forced forward passes and closed forms.

All runs share a few shapes so that the jitted `generate` compiles only a handful of times.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from rlhf_jax.losses import token_logps
from rlhf_jax.models import Transformer, TransformerConfig, init_params
from rlhf_jax.sampling import generate

STATIC = ("model", "max_new_tokens", "top_k", "eos_id", "pad_id")
gen = jax.jit(generate, static_argnames=STATIC)  # temperature and top_p traced

CFG = TransformerConfig(vocab_size=61, max_len=32, d_model=32, n_layers=2, n_heads=2)
MODEL = Transformer(CFG)
B, PLEN, N, PAD = 16, 6, 10, 3


@functools.partial(jax.jit, static_argnums=(0, 2))
def _params(cfg, seed, scale):
    """Random params scaled so that next-token distributions are peaked."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = [
        (x * scale if x.ndim > 1 else x) + 0.1 * jax.random.normal(k, x.shape)
        for x, k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(treedef, new)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens, mask):
    return model.apply({"params": params}, tokens, mask)


def _prompts(seed=0, b=B, vocab=CFG.vocab_size):
    """Left-padded prompts [b, PLEN] with real lengths in 1..PLEN (pads hold token 1, not PAD)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, PLEN)).astype(np.int32)
    lengths = rng.integers(1, PLEN + 1, b)
    lengths[0] = PLEN
    mask = (np.arange(PLEN)[None] >= PLEN - lengths[:, None]).astype(np.int32)
    return np.where(mask == 1, tokens, 1).astype(np.int32), mask


@pytest.fixture(scope="module")
def setup():
    params = _params(CFG, 0, 4.0)
    prompts, mask = _prompts()
    # A reference sampling run without EOS; its most frequent token becomes the EOS of the tests.
    ref = gen(MODEL, params, prompts, mask, jax.random.key(1), max_new_tokens=N, top_p=1.0)
    values, counts = np.unique(np.asarray(ref.tokens), return_counts=True)
    return params, prompts, mask, ref, int(values[np.argmax(counts)])


def _teacher_forced(params, prompts, mask, out):
    """Logits [B, N, V] predicting each generated token: one forward over prompt + completion."""
    tokens = jnp.concatenate([prompts, out.tokens], axis=1)
    full_mask = jnp.concatenate([mask, out.mask], axis=1)
    logits = _forward(MODEL, params, tokens, full_mask)
    return np.asarray(logits[:, PLEN - 1 : -1])


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (0.0, 1.0)])
def test_logps_equal_teacher_forced_token_logps(setup, temperature, top_p):
    params, prompts, mask, _, eos = setup
    out = gen(
        MODEL, params, prompts, mask, jax.random.key(2), max_new_tokens=N,
        temperature=temperature, top_p=top_p, eos_id=eos, pad_id=PAD,
    )  # fmt: skip
    logits = _teacher_forced(params, prompts, mask, out)
    scale = temperature if temperature > 0 else 1.0
    expected = np.asarray(token_logps(jnp.asarray(logits / scale), out.tokens))
    live = np.asarray(out.mask).astype(bool)
    assert live.sum() > B  # rows generate several tokens
    np.testing.assert_allclose(np.asarray(out.logps)[live], expected[live], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.logps)[~live], 0.0)
    if temperature == 0.0:  # greedy: every token is the argmax of the teacher-forced logits
        np.testing.assert_array_equal(np.asarray(out.tokens)[live], logits.argmax(-1)[live])


def test_greedy_static_and_traced_temperature_agree(setup):
    params, prompts, mask, _, eos = setup
    kw = dict(max_new_tokens=N, eos_id=eos, pad_id=PAD, top_p=1.0)
    traced = gen(MODEL, params, prompts, mask, jax.random.key(3), temperature=0.0, **kw)
    static = jax.jit(generate, static_argnames=STATIC + ("temperature",))(
        MODEL, params, prompts, mask, jax.random.key(4), temperature=0.0, **kw
    )
    for a, b in zip(traced, static):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_eos_handling(setup):
    params, prompts, mask, ref, eos = setup
    out = gen(
        MODEL, params, prompts, mask, jax.random.key(1), max_new_tokens=N, top_p=1.0,
        eos_id=eos, pad_id=PAD,
    )  # fmt: skip
    tokens, ref_tokens = np.asarray(out.tokens), np.asarray(ref.tokens)
    stopped_early = 0
    for b in range(B):
        hits = np.nonzero(ref_tokens[b] == eos)[0]
        end = hits[0] + 1 if len(hits) else N  # tokens kept, EOS included
        stopped_early += end < N
        # Same key per step: identical up to and including EOS, then pads with mask 0 and logp 0.
        np.testing.assert_array_equal(tokens[b, :end], ref_tokens[b, :end])
        np.testing.assert_array_equal(out.mask[b, :end], 1)
        np.testing.assert_allclose(out.logps[b, :end], ref.logps[b, :end], atol=1e-6)
        np.testing.assert_array_equal(tokens[b, end:], PAD)
        np.testing.assert_array_equal(out.mask[b, end:], 0)
        np.testing.assert_array_equal(out.logps[b, end:], 0.0)
    assert 0 < stopped_early < B


def _allowed(logits, temperature, top_k, top_p):
    """Boolean [..., V]: tokens that top-k then top-p (on the renormalised top-k) may emit."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, axis=-1)
    sorted_z = np.take_along_axis(z, order, -1)
    keep = np.ones_like(sorted_z, bool)
    if top_k is not None:
        keep[..., top_k:] = False
    if top_p is not None:
        p = np.where(keep, np.exp(sorted_z - sorted_z[..., :1]), 0.0)
        p /= p.sum(-1, keepdims=True)
        before = np.cumsum(p, -1) - p
        keep &= before < top_p
        keep[..., 0] = True
    allowed = np.zeros_like(keep)
    np.put_along_axis(allowed, order, keep, -1)
    return allowed


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (None, 0.5), (5, 0.6)])
def test_truncation_never_emits_excluded_tokens(setup, top_k, top_p):
    params, prompts, mask, _, eos = setup
    out = gen(
        MODEL, params, prompts, mask, jax.random.key(6), max_new_tokens=N, temperature=1.3,
        top_k=top_k, top_p=top_p, eos_id=eos, pad_id=PAD,
    )  # fmt: skip
    logits = _teacher_forced(params, prompts, mask, out)
    allowed = _allowed(logits, 1.3, top_k, top_p if top_p < 1 else None)
    picked = np.take_along_axis(allowed, np.asarray(out.tokens)[..., None], -1)[..., 0]
    live = np.asarray(out.mask).astype(bool)
    assert picked[live].all()
    assert allowed.sum(-1).min() < CFG.vocab_size / 2  # the truncation actually excluded tokens
    assert len(np.unique(np.asarray(out.tokens)[live])) > 1


def test_first_token_distribution_matches_softmax():
    """Chi-square goodness of fit of 4000 first tokens (one batched call) on an 8-token vocab."""
    cfg = TransformerConfig(vocab_size=8, max_len=8, d_model=16, n_layers=1, n_heads=2)
    model, params = Transformer(cfg), _params(cfg, 7, 2.0)
    n_samples, temperature = 4000, 1.5
    prompt = np.array([[1, 5, 2]], np.int32)
    prompts, mask = np.repeat(prompt, n_samples, 0), np.ones((n_samples, 3), np.int32)
    logits = np.asarray(_forward(model, params, prompt, mask[:1]))[0, -1]  # [V]
    for seed, top_k, top_p in [(0, None, 1.0), (1, None, 0.7)]:
        out = gen(
            model, params, prompts, mask, jax.random.key(seed), max_new_tokens=1,
            temperature=temperature, top_k=top_k, top_p=top_p,
        )  # fmt: skip
        allowed = _allowed(logits, temperature, top_k, top_p if top_p < 1 else None)
        probs = np.where(allowed, np.exp(logits / temperature - logits.max() / temperature), 0)
        probs /= probs.sum()
        expected = probs * n_samples
        counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=cfg.vocab_size)
        assert counts[~allowed].sum() == 0
        kept = expected > 0
        assert kept.sum() >= 2 and expected[kept].min() > 5, expected
        chi2 = (((counts - expected) ** 2)[kept] / expected[kept]).sum()
        assert chi2 < stats.chi2.ppf(0.999, kept.sum() - 1), (top_k, top_p, counts, expected)
        # The reported logps are those of the untruncated softmax(logits / temperature).
        full = logits / temperature - np.log(np.exp(logits / temperature).sum())
        np.testing.assert_allclose(out.logps[:, 0], full[np.asarray(out.tokens[:, 0])], atol=1e-5)


def test_generate_under_mesh_matches_single_device(setup):
    params, prompts, mask, _, eos = setup
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    kw = dict(max_new_tokens=N, temperature=0.9, top_p=0.95, eos_id=eos, pad_id=PAD)
    single = gen(MODEL, params, prompts, mask, jax.random.key(8), **kw)
    sharded = gen(
        MODEL, jax.device_put(params, replicated), jax.device_put(prompts, rows),
        jax.device_put(mask, rows), jax.random.key(8), **kw,
    )  # fmt: skip
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_array_equal(sharded.mask, single.mask)
    np.testing.assert_allclose(sharded.logps, single.logps, atol=1e-5)


@pytest.mark.parametrize("vocab", [1, 3, 64, 100, 2048, 50257])
def test_inverse_cdf_sample_against_numpy(vocab):
    """The two-level CDF inversion picks the entry a float64 flat CDF picks at the same uniform
    (away from float rounding at a boundary), never a zero-probability entry, and returns the
    log-normaliser."""
    from rlhf_jax.sampling import _inverse_cdf_sample

    rs = np.random.default_rng(vocab)
    logits = (3 * rs.normal(size=(4, vocab))).astype(np.float32)
    if vocab > 3:
        logits[:, rs.random(vocab) < 0.3] = -np.inf
    logits[:, 0] = 0.0
    us = rs.random((200, 4)).astype(np.float32)
    draw = jax.jit(jax.vmap(_inverse_cdf_sample, (0, None)))
    tokens, log_norm = (np.asarray(a) for a in draw(jnp.asarray(us), jnp.asarray(logits)))
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    cdf = np.cumsum(p, -1)
    total = cdf[:, -1]
    np.testing.assert_allclose(log_norm[0], np.log(total) + z.max(-1), atol=1e-6, rtol=0)
    for i in range(len(us)):
        for r in range(4):
            target = us[i, r] * total[r]
            assert p[r, tokens[i, r]] > 0
            if np.min(np.abs(cdf[r] - target)) > 1e-5 * total[r]:  # not on a rounding boundary
                assert tokens[i, r] == np.searchsorted(cdf[r], target, side="right")


def test_groups_of_completions_equal_generate_on_repeated_prompts(setup):
    """num_samples=G: one prefill per prompt, [P, G, N] outputs, the same draws as `generate` on
    every prompt repeated G times (rows p * G + g) with the same key; the G completions of a
    prompt differ from each other, and each row's log-probs are its teacher-forced ones."""
    params, prompts, mask, _, eos = setup
    p, g = 4, 3
    groups = jax.jit(generate, static_argnames=(*STATIC, "num_samples"))
    kw = dict(max_new_tokens=N, temperature=0.9, eos_id=eos, pad_id=PAD)
    out = groups(MODEL, params, prompts[:p], mask[:p], jax.random.key(7), num_samples=g, **kw)
    assert out.tokens.shape == out.logps.shape == out.mask.shape == (p, g, N)
    flat = gen(
        MODEL, params, np.repeat(prompts[:p], g, 0), np.repeat(mask[:p], g, 0),
        jax.random.key(7), **kw,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.tokens).reshape(p * g, N), flat.tokens)
    np.testing.assert_array_equal(np.asarray(out.mask).reshape(p * g, N), flat.mask)
    np.testing.assert_allclose(np.asarray(out.logps).reshape(p * g, N), flat.logps, atol=1e-6)
    assert all(len({tuple(r) for r in np.asarray(out.tokens)[i]}) > 1 for i in range(p))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        generate(MODEL, params, prompts, mask, jax.random.key(0), max_new_tokens=2, num_samples=0)
