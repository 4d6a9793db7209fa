"""Every family trained: a DPO step on a 2x2x2 mesh of 8 host devices equals the one-device step
(whole heads per tensor shard), and the drivers run a Llama (SFT -> DPO) and a Gemma 2 (SFT ->
PPO, a window shorter than the rollouts) and hand over folders transformers loads with our
logits. Split from test_families.py so that the two halves run on different test workers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import drivers, families
from helpers.batches import preference_batch
from helpers.families import FAMILIES, TOL, VOCAB, T, hf_logits
from helpers.families import logits as _logits

from rlhf_jax import models, sharding
from rlhf_jax.train import create_train_state, make_dpo_step, make_optimizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> (transformers model, its folder), built once per module."""
    return families.checkpoints(tmp_path_factory)


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


def _driver(name):
    return drivers.load(name, f"families_driver_{name}")


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
