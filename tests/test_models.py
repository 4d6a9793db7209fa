"""Tests of rlhf_jax.models: layout, padding, KV cache, dtype policy, remat, reward/value heads."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import (
    RewardModel,
    Transformer,
    TransformerConfig,
    ValueModel,
    get_config,
    init_cache,
    init_params,
    init_reward_params,
    init_value_params,
    last_token_index,
)

CFG = TransformerConfig(vocab_size=97, max_len=32, d_model=48, n_layers=2, n_heads=3)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _params(cfg=CFG, seed=0, scale=5.0):
    """Random params with non-trivial LayerNorms and biases (scaled so logits are not ~uniform)."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = [
        (x * scale if x.ndim > 1 else x) + 0.1 * jax.random.normal(k, x.shape)
        for x, k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(treedef, new)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _apply(model, method, kwargs, params, *args):
    """Jitted `model.apply` (eager Flax dispatch is slow on the shared test CPU)."""
    return model.apply({"params": params}, *args, method=method, **dict(kwargs))


def _fwd(cfg, params, *args):
    return _apply(Transformer(cfg), "__call__", (), params, *args)


def _tokens(shape, seed=0, vocab=CFG.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def test_presets_and_parameter_counts():
    def count(cfg):
        shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

    # Parameter counts of HF's GPT2LMHeadModel (tied lm_head not counted twice).
    assert count(get_config("gpt2")) == 124_439_808
    assert count(get_config("gpt2-medium")) == 354_823_168
    tiny = get_config("tiny")
    assert (tiny.vocab_size, tiny.max_len, tiny.d_model, tiny.n_layers, tiny.n_heads) == (
        1024,
        128,
        64,
        2,
        4,
    )
    assert tiny.d_ff == 256 and get_config("tiny", d_model=32).d_ff == 128
    assert get_config("small", d_ff=100).d_ff == 100
    with pytest.raises(ValueError):
        TransformerConfig(d_model=10, n_heads=3)
    # Gemma's pattern (every second layer global) follows an overridden depth.
    assert get_config("gemma-2-2b").layer_types[:2] == ("sliding_attention", "full_attention")
    assert get_config("gemma2-tiny", n_layers=3).layer_types == (
        "sliding_attention", "full_attention", "sliding_attention",
    )  # fmt: skip


# Parameter counts of the released checkpoints (transformers' `num_parameters()` of each model):
# the published shapes of `get_config` reproduce them exactly, counted from the abstract tree.
PUBLISHED = {
    "pythia-2.8b": 2_775_208_960, "llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496, "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360, "gemma-2-2b": 2_614_341_888, "gemma-2-9b": 9_241_705_984,
    "mistral-7b": 7_241_732_096,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shapes(name):
    cfg = get_config(name)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PUBLISHED[name]
    assert cfg.num_params() == PUBLISHED[name]


def test_parameter_layout():
    """One layout for every family; attention projections keep their head axis."""
    p = init_params(CFG, jax.random.key(0))
    assert set(p) == {"embed", "pos_embed", "final_norm", "layers_0", "layers_1"}
    assert p["embed"]["embedding"].shape == (97, 48)
    assert p["pos_embed"]["embedding"].shape == (32, 48)
    h = p["layers_1"]
    heads, dh = CFG.n_heads, 48 // CFG.n_heads
    for name in "qkv":
        assert h["attn"][name]["kernel"].shape == (48, heads, dh)
        assert h["attn"][name]["bias"].shape == (heads, dh)
    assert h["attn"]["o"]["kernel"].shape == (heads, dh, 48)
    assert h["mlp"]["up"]["kernel"].shape == (48, 192)
    assert h["mlp"]["down"]["kernel"].shape == (192, 48)
    assert set(h["attn_norm"]) == {"scale", "bias"} and set(h["mlp_norm"]) == {"scale", "bias"}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    gqa = get_config("llama-tiny")
    g = init_params(gqa, jax.random.key(0))
    assert g["layers_0"]["attn"]["k"]["kernel"].shape == (64, 2, 16)
    assert g["layers_0"]["attn"]["q"]["kernel"].shape == (64, 8, 16)
    assert set(g) == {"embed", "final_norm", "layers_0", "layers_1", "lm_head"}
    assert g["lm_head"]["kernel"].shape == (64, gqa.vocab_size)


def _padded(rows, lengths, side, pad_id=0):
    """Row i's first lengths[i] tokens, left- or right-padded to the width of `rows` [B, W]
    -> (tokens, mask, slice of the real tokens per row)."""
    b, width = rows.shape
    tokens, mask, where = np.full((b, width), pad_id, np.int32), np.zeros((b, width), np.int32), []
    for i, n in enumerate(lengths):
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        tokens[i, sl], mask[i, sl] = rows[i, :n], 1
        where.append(sl)
    return tokens, mask, where


def test_left_and_right_padding_match_unpadded():
    params = _params()
    rows = _tokens((3, 9), seed=1)
    lengths = [9, 5, 2]
    # By causality the logits of a row's prefix are the first logits of the unpadded row.
    alone = np.asarray(_fwd(CFG, params, rows))  # [3, 9, V]
    for side in ("left", "right"):
        tokens, mask, where = _padded(rows, lengths, side, pad_id=7)
        logits = np.asarray(_fwd(CFG, params, tokens, mask))
        assert np.all(np.isfinite(logits))
        for i, (sl, n) in enumerate(zip(where, lengths)):
            np.testing.assert_allclose(logits[i, sl], alone[i, :n], atol=1e-5, rtol=0)


def test_kv_cache_decoding_equals_full_forward():
    params, model = _params(), Transformer(CFG)
    b, t = 3, 14
    tokens = _tokens((b, t), seed=3)
    mask = np.ones((b, t), np.int32)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    full = np.asarray(_fwd(CFG, params, tokens, mask))

    def run(chunks):
        cache = init_cache(CFG, b, t)
        out, start = [], 0
        for size in chunks:
            sl = slice(start, start + size)
            logits, cache = _apply(model, "decode", (), params, tokens[:, sl], mask[:, sl], cache)
            out.append(np.asarray(logits))
            start += size
        assert int(cache.index) == t
        np.testing.assert_array_equal(cache.positions, mask.sum(1))
        return np.concatenate(out, axis=1)

    real = mask.astype(bool)
    token_by_token = run([1] * t)
    np.testing.assert_allclose(token_by_token[real], full[real], atol=1e-5, rtol=0)
    chunked = run([10, 1, 3])  # prefill the prompt, then decode
    np.testing.assert_allclose(chunked[real], full[real], atol=1e-5, rtol=0)
    # last_only returns the final position's logits
    cache = init_cache(CFG, b, t)
    last, _ = _apply(model, "decode", (("last_only", True),), params, tokens, mask, cache)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=0)


def test_bfloat16_compute_is_close_to_float32():
    params = _params()
    tokens, mask, _ = _padded(_tokens((3, 9), seed=1), [9, 5, 2], "left", pad_id=7)
    f32 = _fwd(CFG, params, tokens, mask)
    bf16 = _fwd(dataclasses.replace(CFG, dtype="bfloat16"), params, tokens, mask)
    assert bf16.dtype == jnp.float32
    real = mask.astype(bool)
    err = np.abs(np.asarray(bf16) - np.asarray(f32))[real].max()
    assert err < 0.05 * np.abs(np.asarray(f32)[real]).max(), err
    # Same argmax almost everywhere.
    agree = (np.asarray(bf16).argmax(-1) == np.asarray(f32).argmax(-1))[real].mean()
    assert agree > 0.9


def _loss_fn(tokens, mask, target):
    def loss(p, cfg):
        logits = Transformer(cfg).apply({"params": p}, tokens, mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., target] * mask)

    return loss


def _assert_same_loss_and_grads(loss, params, cfg_a, cfg_b):
    """The two configs give the same loss and gradients; returns cfg_b's gradients."""
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (la, ga), (lb, gb) = grad(params, cfg_a), grad(params, cfg_b)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gb))
    return gb


def test_remat_gives_same_logits_and_grads():
    tokens, mask = _tokens((2, 9), seed=5), np.ones((2, 9), np.int32)
    mask[1, :2] = 0
    loss = _loss_fn(tokens, mask, 3)
    _assert_same_loss_and_grads(loss, _params(), dataclasses.replace(CFG, remat=True), CFG)


def test_grad_barrier_changes_no_number():
    params = _params()
    tokens, mask = _tokens((2, 9), seed=6), np.ones((2, 9), np.int32)
    mask[0, :3] = 0
    loss = _loss_fn(tokens, mask, 5)
    on, off = CFG, dataclasses.replace(CFG, grad_barrier=False)
    assert on.grad_barrier  # the default
    grads = _assert_same_loss_and_grads(loss, params, on, off)

    # The barrier is in the backward program only when switched on.
    def backward_text(cfg):
        return jax.jit(jax.grad(loss), static_argnums=1).lower(params, cfg).as_text()

    assert "optimization_barrier" in backward_text(on)
    assert "optimization_barrier" not in backward_text(off)
    # Forward-mode AD needs the barrier off (a custom_vjp function has no JVP).
    tangent = jax.tree.map(jnp.ones_like, params)
    _, jvp_off = jax.jvp(lambda p: loss(p, off), (params,), (tangent,))
    expected = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangent)))
    np.testing.assert_allclose(jvp_off, expected, rtol=1e-4)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda p: loss(p, on), (params,), (tangent,))


@pytest.mark.parametrize("slots", [1, 7, 12, 16])
def test_decode_attention_against_numpy(slots):
    from rlhf_jax.models.attention import decode_attention

    rs = np.random.default_rng(slots)
    b, h, d = 3, 2, 8
    q = rs.normal(size=(b, h, d)).astype(np.float32)
    k = rs.normal(size=(b, h, slots, d)).astype(np.float32)
    v = rs.normal(size=(b, h, slots, d)).astype(np.float32)
    key_ok = rs.random((b, slots)) < 0.6
    key_ok[:, 0] = True  # every row sees at least one slot
    got = np.asarray(jax.jit(decode_attention)(q, k, v, key_ok))
    want = np.zeros((b, h, d))
    for i in range(b):
        for j in range(h):
            s = [np.dot(q[i, j], k[i, j, n]) / np.sqrt(d) for n in range(slots) if key_ok[i, n]]
            p = np.exp(np.array(s, np.float64) - max(s))
            p /= p.sum()
            want[i, j] = sum(w * v[i, j, n] for w, n in zip(p, np.flatnonzero(key_ok[i])))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_attention_config_validation():
    with pytest.raises(ValueError, match=r"attention must be one of \('xla', 'cudnn'\)"):
        TransformerConfig(attention="flash")
    with pytest.raises(ValueError, match="needs dtype='bfloat16'"):
        TransformerConfig(attention="cudnn")
    assert TransformerConfig(attention="cudnn", dtype="bfloat16").attention == "cudnn"


def test_cudnn_padding_detects_right_padded_batches():
    from rlhf_jax.models.attention import padding

    def check(rows):
        ok = np.asarray(rows, np.int32)
        pad = padding(jnp.asarray(ok), jnp.zeros((1,)))
        np.testing.assert_array_equal(pad.lengths, ok.sum(1))
        right = all(list(r) == sorted(r, reverse=True) for r in ok)  # ones, then zeros
        assert bool(pad.right_padded) == right
        return right

    assert check([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    assert not check([[1, 1, 1], [0, 1, 1]])  # a left-padded row
    assert not check([[1, 0, 1]])
    assert check([[0, 0, 0], [1, 1, 1]])


def test_cudnn_attention_wiring(monkeypatch):
    """attention='cudnn' sends full forward passes to jax.nn.dot_product_attention with
    implementation='cudnn', causal, padding as sequence lengths (never a bias: no gradient for
    one), and left-padded batches to the XLA mask path; decoding never goes there. The kernel
    needs an NVIDIA GPU: here each call is recorded and answered by the XLA implementation with
    the same arguments."""
    from rlhf_jax.models import attention as attn

    real, real_xla = jax.nn.dot_product_attention, attn.attention
    calls = []

    def recording(q, k, v, *, implementation=None, **kw):
        given = tuple(
            sorted(k for k, value in kw.items() if value is not None and value is not False)
        )
        calls.append((implementation, tuple(g for g in given if g != "scale")))
        return real(q, k, v, **kw)

    def recording_xla(q, k, v, mask, *args):
        calls.append(("xla", ("mask",) if mask is not None else ("is_causal",)))
        return real_xla(q, k, v, mask, *args)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    monkeypatch.setattr(attn, "attention", recording_xla)
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    cudnn = dataclasses.replace(bf16, attention="cudnn")
    params = _params()
    fused = ("cudnn", ("is_causal",))
    fused_padded = ("cudnn", ("is_causal", "key_value_seq_lengths", "query_seq_lengths"))
    fallback = ("xla", ("mask",))

    def both(*args):
        calls.clear()
        want = np.asarray(Transformer(bf16).apply({"params": params}, *args))
        xla_calls = list(calls)
        calls.clear()
        got = np.asarray(Transformer(cudnn).apply({"params": params}, *args))
        return want, got, xla_calls, list(calls)

    tokens = _tokens((3, 9), seed=2)
    want, got, xla_calls, cudnn_calls = both(tokens)  # unpadded
    assert xla_calls == [("xla", ("is_causal",))] * CFG.n_layers
    assert cudnn_calls == [fused] * CFG.n_layers
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for side in ("right", "left"):
        padded, mask, _ = _padded(tokens, [9, 5, 2], side)
        want, got, _, cudnn_calls = both(padded, mask)
        assert cudnn_calls == [fused_padded, fallback] * CFG.n_layers  # lax.cond traces both
        real_tokens = mask.astype(bool)
        np.testing.assert_allclose(got[real_tokens], want[real_tokens], atol=1e-5, rtol=0)
        if side == "left":  # the fallback branch ran: the very same computation
            np.testing.assert_array_equal(got, want)
        else:  # the fused branch ran: pad queries see nothing there, themselves under the mask
            assert np.abs(got[~real_tokens] - want[~real_tokens]).max() > 1e-3
    # Decoding against a cache stays on the XLA path (a chunk) or the fused decode step.
    calls.clear()
    cache = init_cache(cudnn, 3, 10)
    _, cache = Transformer(cudnn).apply({"params": params}, padded, mask, cache, method="decode")
    assert calls == [fallback] * CFG.n_layers
    calls.clear()
    step = np.ones((3, 1), np.int32)
    Transformer(cudnn).apply({"params": params}, step, step, cache, method="decode")
    assert calls == []
    # Layers with a sliding window or a soft-cap never go to cuDNN.
    gemma = get_config("gemma2-tiny", vocab_size=97, dtype="bfloat16", attention="cudnn")
    g_params = init_params(gemma, jax.random.key(1))
    calls.clear()
    Transformer(gemma).apply({"params": g_params}, tokens % 97)
    assert all(impl == "xla" for impl, _ in calls) and len(calls) == gemma.n_layers


def test_last_token_index_against_loop():
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = [max(np.nonzero(row)[0]) for row in mask]
    np.testing.assert_array_equal(last_token_index(mask), expected)


def test_reward_model_scores_last_real_token():
    lm = _params()
    params = init_reward_params(CFG, jax.random.key(7), lm_params=lm)
    # Structure equals the module's own init; the LM params are copied in unchanged.
    model = RewardModel(CFG)
    tokens = np.zeros((1, 3), np.int32)
    own = jax.eval_shape(model.init, jax.random.key(0), tokens, np.ones((1, 3), np.int32))
    assert jax.tree.structure(own["params"]) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params["transformer"]), jax.tree.leaves(lm)):
        np.testing.assert_array_equal(a, b)
    std = np.std(np.asarray(params["head"]["kernel"]))
    assert 0.3 / np.sqrt(CFG.d_model) < std < 3 / np.sqrt(CFG.d_model)
    params["head"]["bias"] = jnp.array([0.3])

    rows, lengths = _tokens((3, 8), seed=11), [6, 3, 8]
    hidden = np.asarray(_apply(Transformer(CFG), "hidden", (), lm, rows))  # [3, 8, D] unpadded
    kernel = np.asarray(params["head"]["kernel"])[:, 0]
    expected = [hidden[i, n - 1] @ kernel + 0.3 for i, n in enumerate(lengths)]
    for side in ("left", "right"):
        tokens, mask, _ = _padded(rows, lengths, side)
        scores = _apply(model, "__call__", (), params, tokens, mask)
        assert scores.shape == (3,)
        np.testing.assert_allclose(scores, expected, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens, mask).sum()))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_value_model_per_token_values():
    lm = _params()
    params = init_value_params(CFG, jax.random.key(8), lm_params=lm)
    tokens, mask = _tokens((2, 7), seed=20), np.ones((2, 7), np.int32)
    mask[0, :2] = 0
    model = ValueModel(CFG)
    np.testing.assert_array_equal(_apply(model, "__call__", (), params, tokens, mask), 0.0)
    own = jax.eval_shape(model.init, jax.random.key(0), tokens, mask)
    assert jax.tree.structure(own["params"]) == jax.tree.structure(params)
    kernel = np.random.default_rng(0).normal(size=(CFG.d_model, 1)).astype(np.float32)
    params["head"] = {"kernel": jnp.asarray(kernel), "bias": jnp.array([-0.2])}
    values = _apply(model, "__call__", (), params, tokens, mask)
    assert values.shape == (2, 7)
    hidden = np.asarray(_apply(Transformer(CFG), "hidden", (), lm, tokens, mask))
    expected = np.einsum("btd,d->bt", hidden, kernel[:, 0]) - 0.2
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(values)[real], expected[real], atol=1e-5)
    fresh = jax.eval_shape(lambda: init_value_params(CFG, jax.random.key(9)))
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
