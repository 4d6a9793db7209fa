"""Parity of rlhf_jax.models with Hugging Face transformers' GPT2LMHeadModel (PyTorch, CPU).

Checkpoints are built from random initialisation with transformers and saved to tmp_path; nothing
is downloaded. Every weight is re-drawn at a scale that makes the logits far from uniform and the
LayerNorms/biases non-trivial, so a mis-mapped tensor cannot hide.
"""

import functools
import json

import jax
import numpy as np
import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from rlhf_jax.models import Transformer, TransformerConfig, from_pretrained, save_pretrained
from rlhf_jax.sampling import generate

torch.set_num_threads(1)

SHAPES = {  # odd widths, head counts, vocabularies and context sizes
    "d72-h3-v1001-ctx67-l2": dict(vocab_size=1001, n_positions=67, n_embd=72, n_head=3, n_layer=2),
    "d40-h5-v257-ctx33-l1-inner100-eps1e-6": dict(
        vocab_size=257, n_positions=33, n_embd=40, n_head=5, n_layer=1, n_inner=100,
        layer_norm_epsilon=1e-6,
    ),
    "d24-h2-v64-ctx16-l3": dict(vocab_size=64, n_positions=16, n_embd=24, n_head=2, n_layer=3),
}  # fmt: skip


def _hf_model(seed: int, **shape) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        **shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # LayerNorm scales/biases and linear biases
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, tokens, mask, positions):
    return Transformer(config).apply({"params": params}, tokens, mask, positions)


def _hf_logits(model, tokens, mask, positions):
    with torch.inference_mode():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(np.asarray(positions), dtype=torch.long),
        )
    return out.logits.float().numpy()


def _batch(vocab, length, seed):
    """Unpadded [3, L] tokens and a left-padded copy of prefixes of lengths L, L-3, 2."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (3, length)).astype(np.int32)
    padded, mask = np.zeros_like(tokens), np.zeros_like(tokens)
    for i, n in enumerate([length, length - 3, 2]):
        padded[i, length - n :], mask[i, length - n :] = tokens[i, :n], 1
    return tokens, padded, mask


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers(name, tmp_path):
    hf = _hf_model(seed=len(name), **SHAPES[name])
    hf.save_pretrained(tmp_path)
    config, params = from_pretrained(str(tmp_path))
    assert config.vocab_size == hf.config.vocab_size and config.max_len == hf.config.n_positions
    assert config.d_ff == (hf.config.n_inner or 4 * hf.config.n_embd)
    length = config.max_len  # the whole context
    tokens, padded, mask = _batch(config.vocab_size, length, seed=1)
    full = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(length), tokens.shape)
    ours = np.asarray(_logits(config, params, tokens, full, positions))
    ref = _hf_logits(hf, tokens, full, positions)
    assert np.abs(ref).max() > 1.0  # far from uniform
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    # Left padding: our positions from the mask vs HF given the same positions explicitly.
    pad_pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    ours = np.asarray(_logits(config, params, padded, mask, None))
    ref = _hf_logits(hf, padded, mask, pad_pos)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


def test_export_round_trip(tmp_path):
    config = TransformerConfig(vocab_size=301, max_len=24, d_model=36, n_layers=2, n_heads=3)
    # Our own random params (independent of the HF model above, drawn with numpy).
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(
        lambda: Transformer(config).init(jax.random.key(0), np.zeros((1, 1), np.int32))
    )
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32) + (len(s.shape) == 1),
        shapes["params"],
    )
    save_pretrained(str(tmp_path), config, params, eos_token_id=300)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["model_type"] == "gpt2" and written["architectures"] == ["GPT2LMHeadModel"]
    assert written["activation_function"] == "gelu_new" and written["eos_token_id"] == 300

    hf, info = GPT2LMHeadModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    tokens, padded, mask = _batch(config.vocab_size, 24, seed=2)
    full = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(24), tokens.shape)
    np.testing.assert_allclose(
        _logits(config, params, tokens, full, positions),
        _hf_logits(hf, tokens, full, positions),
        atol=1e-4,
        rtol=0,
    )
    # ... and back: the folder loads to exactly the params we wrote.
    config2, params2 = from_pretrained(str(tmp_path))
    assert config2 == config
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_greedy_generate_matches_transformers(tmp_path):
    hf = _hf_model(seed=3, **SHAPES["d72-h3-v1001-ctx67-l2"])
    hf.save_pretrained(tmp_path)
    config, params = from_pretrained(str(tmp_path))
    b, p, n = 3, 5, 16
    prompts = np.random.default_rng(4).integers(0, config.vocab_size, (b, p)).astype(np.int32)
    gen_config = GenerationConfig(
        max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    with torch.inference_mode():
        out = hf.generate(
            torch.as_tensor(prompts, dtype=torch.long),
            attention_mask=torch.ones(b, p, dtype=torch.long),
            generation_config=gen_config,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ref_tokens = out.sequences[:, p:].numpy()
    ref_logps = torch.stack(out.logits, 1).float().log_softmax(-1).numpy()  # [B, N, V]
    static = ("model", "max_new_tokens", "top_k", "eos_id", "pad_id")
    gen = jax.jit(generate, static_argnames=static)(
        Transformer(config), params, prompts, np.ones((b, p), np.int32), jax.random.key(0),
        max_new_tokens=n, temperature=0.0,
    )  # fmt: skip
    np.testing.assert_array_equal(gen.tokens, ref_tokens)
    np.testing.assert_array_equal(gen.mask, 1)
    expected = np.take_along_axis(ref_logps, ref_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(gen.logps, expected, atol=1e-4, rtol=0)


def test_clear_errors(tmp_path):
    hf_config = dict(model_type="gpt2", vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_config | {"activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation"):
        from_pretrained(str(tmp_path))
