"""Every family against Hugging Face transformers (PyTorch, CPU, float32), offline.

For each of gpt2, llama, mistral, qwen2, qwen3, gemma2, gemma3_text and gpt_neox, a random
transformers model is built from a config that stresses the family (tests/helpers/families.py:
GQA ratio 3, head_dim != hidden / heads, a sliding window of 5 shorter than every sequence here,
vocabulary 211, RoPE scalings, soft-caps that bite, every weight perturbed away from its init),
saved with `save_pretrained`, and read by `models.from_pretrained`:

- logits ≤ 1e-4 from transformers' on unpadded, left-padded and right-padded rows;
- greedy decoding token for token equal to transformers' `generate`, with left-padded prompts, for
  more new tokens than the window, and the rollout log-probs equal to teacher-forced ones;
- `save_pretrained` -> transformers gives our logits; -> `from_pretrained` gives the same tree;
- a reward model on the family trains one step (its loss is the Bradley-Terry loss of two
  separate forwards, and every trunk tensor moves).

The DPO step on a 2x2x2 mesh and the driver runs are in test_families_training.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import families
from helpers.batches import preference_batch
from helpers.families import FAMILIES, TOL, VOCAB, WINDOW, T, hf_logits, left_padded
from helpers.families import logits as _logits

from rlhf_jax import models
from rlhf_jax.sampling import generate
from rlhf_jax.train import create_train_state, make_optimizer, make_reward_step

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> (transformers model, its folder), built once per module."""
    return families.checkpoints(tmp_path_factory)


def _tokens(seed, b=3, t=T):
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t)).astype(np.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, checkpoint):
    hf, path = checkpoint(family)
    cfg, params = models.from_pretrained(path)
    assert cfg.family == family and cfg.vocab_size == VOCAB
    if family not in ("gpt2", "gpt_neox", "qwen2"):
        assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (6, 2, 16)
    if family in ("mistral", "qwen2", "gemma2", "gemma3_text"):
        assert cfg.sliding_window == WINDOW and any(cfg.window(i) for i in range(cfg.n_layers))
    tokens = _tokens(1)
    np.testing.assert_allclose(_logits(cfg, params, tokens), hf_logits(hf, tokens), atol=TOL)
    # Left-padded rows (prompts) and right-padded rows (training batches): real tokens only.
    padded, mask, positions = left_padded(tokens, [T, T - 5, 3])
    ok = mask.astype(bool)
    got = np.asarray(_logits(cfg, params, padded, mask))
    np.testing.assert_allclose(got[ok], hf_logits(hf, padded, mask, positions)[ok], atol=TOL)
    right, right_mask = np.zeros_like(tokens), (np.arange(T)[None] < [[T], [7], [2]]).astype(int)
    right[right_mask > 0] = tokens[right_mask > 0]
    ok = right_mask.astype(bool)
    got = np.asarray(_logits(cfg, params, right, right_mask))
    np.testing.assert_allclose(got[ok], hf_logits(hf, right, right_mask)[ok], atol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_matches_transformers_generate(family, checkpoint):
    hf, path = checkpoint(family)
    cfg, params = models.from_pretrained(path)
    prompts, mask, _ = left_padded(_tokens(2, t=8), [8, 5, 2])
    n = 3 * WINDOW  # more new tokens than the window: decoding slides past it
    model = models.Transformer(cfg)
    static = ("model", "max_new_tokens", "eos_id", "pad_id")
    gen = jax.jit(generate, static_argnames=static)
    out = gen(model, params, prompts, mask, jax.random.key(0), max_new_tokens=n, temperature=0.0)
    with torch.inference_mode():
        theirs = hf.generate(
            input_ids=torch.as_tensor(prompts, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
            eos_token_id=None,
        ).numpy()[:, prompts.shape[1] :]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.tokens), theirs)
    assert np.asarray(out.mask).all()
    # The rollout's log-probs are the teacher-forced ones of the same sequence.
    full = np.concatenate([prompts, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
    logits = np.asarray(_logits(cfg, params, full, full_mask), np.float64)
    p = prompts.shape[1]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(logp[:, p - 1 : -1], full[:, p:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logps), want, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, checkpoint, tmp_path):
    import transformers

    _, path = checkpoint(family)
    cfg, params = models.from_pretrained(path)
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda x: (x + 0.05 * rs.randn(*x.shape)).astype(np.float32), params)
    models.save_pretrained(str(tmp_path), cfg, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == {
        "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
    }[family]  # fmt: skip
    tokens = _tokens(3)
    np.testing.assert_allclose(_logits(cfg, params, tokens), hf_logits(hf, tokens), atol=TOL)
    again, back = models.from_pretrained(str(tmp_path))
    assert again == cfg
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_configs_that_a_family_cannot_express_are_refused_before_writing(tmp_path):
    cfg = models.get_config("mistral-7b", n_layers=2, layer_types=("sliding_attention",) * 2)
    cfg = dataclasses.replace(cfg, layer_types=("full_attention", "sliding_attention"))
    with pytest.raises(ValueError, match="cannot be written as a 'mistral' checkpoint"):
        models.save_pretrained(str(tmp_path / "out"), cfg, {})
    odd = models.get_config("llama-tiny", n_heads=6)  # 64 % 6: transformers refuses it
    with pytest.raises(ValueError, match="not a multiple of the number of attention heads"):
        models.save_pretrained(str(tmp_path / "out"), odd, {})
    assert not (tmp_path / "out").exists()
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'; supported: gpt2"):
        models.config_from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "vocab_size": 8, "max_position_embeddings": 8, "hidden_size": 8,'
        '"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,'
        '"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}'
    )
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'"):
        models.config_from_pretrained(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_model_trains_one_step(family, checkpoint):
    _, path = checkpoint(family)
    cfg, lm = models.from_pretrained(path)
    rm = models.RewardModel(cfg)
    params = models.init_reward_params(cfg, jax.random.key(0), lm)
    batch = preference_batch(1, 4, T, VOCAB)
    fwd = jax.jit(rm.apply)
    r_c, r_r = (
        np.asarray(fwd({"params": params}, batch[f"{s}_tokens"], batch[f"{s}_attention_mask"]))
        for s in ("chosen", "rejected")
    )
    want = np.mean(np.log1p(np.exp(-(r_c.astype(np.float64) - r_r))))
    tx = make_optimizer(1e-3)
    state = create_train_state(jax.tree.map(jnp.copy, params), tx, 0)
    new, metrics = jax.jit(make_reward_step(rm, tx))(state, batch)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    moved = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new.params, params
    )
    # Every trunk tensor moves; the output layer is not on the reward's path, and the head's bias
    # cancels in r(chosen) - r(rejected).
    moved["head"].pop("bias")
    moved["transformer"].pop("lm_head", None)
    assert all(jax.tree.leaves(moved)), moved


def test_sharded_safetensors_load_like_one_file(checkpoint, tmp_path):
    """A checkpoint saved in several safetensors shards (model.safetensors.index.json) loads to
    the same tree as the single file."""
    hf, path = checkpoint("qwen3")
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    cfg, one = models.from_pretrained(path)
    cfg2, many = models.from_pretrained(str(tmp_path))
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(one)):
        np.testing.assert_array_equal(a, b)
