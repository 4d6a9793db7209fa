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
- a DPO step on a 2x2x2 mesh of 8 host devices equals the one-device step ≤ 1e-5;
- a reward model on the family trains one step (its loss is the Bradley-Terry loss of two
  separate forwards, and every trunk tensor moves).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.batches import preference_batch
from helpers.families import FAMILIES, VOCAB, WINDOW, hf_logits, left_padded, save_hf

from rlhf_jax import models, sharding
from rlhf_jax.sampling import generate
from rlhf_jax.train import create_train_state, make_dpo_step, make_optimizer, make_reward_step

torch.set_num_threads(1)
TOL = 1e-4
T = 16  # > 3 windows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> (transformers model, its folder), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[family] = (save_hf(family, path, seed=FAMILIES.index(family)), str(path))
        return cache[family]

    return get


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, tokens, mask=None):
    return models.Transformer(config).apply({"params": params}, tokens, mask)


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


def _perturbed(params, seed, scale=0.05):
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda x: (x + scale * rs.randn(*x.shape)).astype(np.float32), params)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_step_on_a_2x2x2_mesh_equals_one_device(family, checkpoint):
    _, path = checkpoint(family)
    cfg, params = models.from_pretrained(path)
    tx = make_optimizer(1e-2, weight_decay=0.01, max_grad_norm=1.0, eps=1e-3)
    state = create_train_state(params, tx, 0, frozen=_perturbed(params, 1), hparams={"beta": 0.1})
    state = jax.tree.map(np.asarray, state)
    step = make_dpo_step(models.Transformer(cfg), tx)
    batch = preference_batch(0, 8, T, VOCAB)
    want_state, want = jax.jit(step)(jax.tree.map(jnp.asarray, state), batch)
    mesh = sharding.make_mesh(2, 2, 2)
    sharded = sharding.shard_state(state, mesh)
    q = sharded.params["layers_0"]["attn"]["q"]["kernel"]
    assert q.addressable_shards[0].data.shape[1] == cfg.n_heads // 2  # whole heads per shard
    compiled = sharding.compile_step(step, mesh, sharded, batch)
    got_state, got = compiled(sharded, sharding.shard_batch(batch, mesh))
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


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


def _driver(name):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"families_driver_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_drivers_run_a_llama_from_sft_to_dpo_and_hand_over_a_llama(tmp_path):
    """The SFT driver trains a Llama-shaped model (GQA, untied, llama3 RoPE) and hands over a
    Llama folder; the DPO driver starts from it (`--init-from`: pair sampling with the KV cache,
    policy and reference) and hands over a folder that transformers loads as `LlamaForCausalLM`
    with our logits."""
    import transformers

    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    _driver("sft").main(["--preset", "tiny", "--model", "llama-tiny", "--workdir", str(sft_dir)])
    cfg, _ = models.from_pretrained(str(sft_dir / "hf"))
    assert (cfg.family, cfg.n_kv_heads, cfg.tie_embeddings) == ("llama", 2, False)
    rows = _driver("dpo").main(
        ["--preset", "tiny", "--workdir", str(dpo_dir), "--init-from", str(sft_dir)]
    )
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    cfg, params = models.from_pretrained(str(dpo_dir / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(dpo_dir / "hf")).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    np.testing.assert_allclose(_logits(cfg, params, tokens), hf_logits(hf, tokens), atol=TOL)


@pytest.mark.slow
def test_drivers_run_ppo_on_a_gemma2_with_a_window_shorter_than_the_rollouts(tmp_path):
    """PPO (ground-truth reward) from a Gemma 2 SFT model whose sliding window (8) is shorter than
    prompt + completion: rollouts through the KV cache, the value model on the same trunk, and a
    hand-over folder that transformers loads as `Gemma2ForCausalLM` with our logits."""
    import transformers

    sft_dir, ppo_dir = tmp_path / "sft", tmp_path / "ppo"
    _driver("sft").main(["--preset", "tiny", "--model", "gemma2-tiny", "--workdir", str(sft_dir)])
    argv = ["--preset", "tiny", "--workdir", str(ppo_dir), "--init-from", str(sft_dir)]
    rows = _driver("ppo").main(argv + ["--reward", "ground-truth"])
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    cfg, params = models.from_pretrained(str(ppo_dir / "hf"))
    assert cfg.family == "gemma2" and cfg.sliding_window == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(ppo_dir / "hf"), attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == "Gemma2ForCausalLM"
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    np.testing.assert_allclose(_logits(cfg, params, tokens), hf_logits(hf, tokens), atol=TOL)


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
