"""LoRA interchange with the PyTorch world, against the real `peft` and `transformers` packages.

- our adapters saved in PEFT's format load onto the transformers model with `PeftModel` and give
  our adapted logits (families with separate projections, GPT-2's fused Conv1D `c_attn` and
  GPT-NeoX's head-interleaved `query_key_value`);
- an adapter PEFT wrote (random A and B, a per-module rank, rsLoRA scaling) loads into ours with
  PEFT's logits;
- the merged model exported with `save_pretrained` is a plain HF folder whose transformers logits
  are the adapted model's.
"""

import json

import jax
import numpy as np
import pytest
from helpers import families as fam

from rlhf_jax import lora, models
from rlhf_jax.lora import peft as peft_io

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

TOKENS = np.random.default_rng(0).integers(0, fam.VOCAB, (2, fam.T))
LORA = lora.LoraConfig(rank=3, alpha=5.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return fam.checkpoints(tmp_path_factory)


def _ours(cfg, base, adapters, lora_cfg):
    model = lora.LoraTransformer(cfg, lora_cfg)
    return np.asarray(model.apply({"params": {"base": base, "lora": adapters}}, TOKENS))


def _random_adapters(base, lora_cfg, seed=1):
    adapters = lora.init_adapters(base, lora_cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_our_adapters_load_in_peft_with_our_logits(family, checkpoint, tmp_path):
    hf, folder = checkpoint(family)
    cfg, base = models.from_pretrained(folder)
    adapters = _random_adapters(base, LORA)
    ours = _ours(cfg, base, adapters, LORA)
    assert np.abs(ours - fam.hf_logits(hf, TOKENS)).max() > 1e-2  # the adapters matter
    peft_io.save_peft(str(tmp_path / "adapter"), cfg, adapters, LORA)
    fresh = fam.hf_model(family, seed=fam.FAMILIES.index(family))  # the same weights
    wrapped = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(fam.hf_logits(wrapped, TOKENS), ours, atol=fam.TOL)
    # And back: our reader gives the same adapted model (fused q/k/v come back at rank 3r).
    back, back_cfg = peft_io.load_peft(str(tmp_path / "adapter"), cfg)
    np.testing.assert_allclose(_ours(cfg, base, back, back_cfg), ours, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_an_adapter_peft_wrote_loads_with_peft_logits(family, checkpoint, tmp_path):
    hf, folder = checkpoint(family)
    targets = ["c_attn", "c_proj", "c_fc"] if family == "gpt2" else [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]  # fmt: skip
    pattern = {"c_fc": 2} if family == "gpt2" else {"up_proj": 2}
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=targets, rank_pattern=pattern, use_rslora=True,
        init_lora_weights=False, lora_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(3)
    model = peft.get_peft_model(fam.hf_model(family, seed=fam.FAMILIES.index(family)), config)
    model.eval()
    model.save_pretrained(str(tmp_path / "written"))
    want = fam.hf_logits(model, TOKENS)
    assert np.abs(want - fam.hf_logits(hf, TOKENS)).max() > 1e-2  # random B: not the base
    cfg, base = models.from_pretrained(folder)
    adapters, lora_cfg = peft_io.load_peft(str(tmp_path / "written"), cfg)
    assert lora_cfg.rank == 4 and lora_cfg.alpha == 6
    np.testing.assert_allclose(_ours(cfg, base, adapters, lora_cfg), want, atol=fam.TOL)


@pytest.mark.parametrize("family", ["gpt_neox"])
def test_merged_export_is_a_plain_hf_folder_with_the_adapted_logits(family, checkpoint, tmp_path):
    _, folder = checkpoint(family)
    cfg, base = models.from_pretrained(folder)
    adapters = _random_adapters(base, LORA, seed=4)
    models.save_pretrained(str(tmp_path / "merged"), cfg, lora.merge(base, adapters, LORA))
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "merged"), attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(
        fam.hf_logits(merged, TOKENS), _ours(cfg, base, adapters, LORA), atol=fam.TOL
    )


def test_bad_adapter_folders_are_refused_with_the_reason(checkpoint, tmp_path):
    _, folder = checkpoint("llama")
    cfg, base = models.from_pretrained(folder)
    only_q = lora.LoraConfig(rank=2, targets=r"attn/q$")
    adapters = lora.init_adapters(base, only_q, jax.random.key(0))
    peft_io.save_peft(str(tmp_path / "ok"), cfg, adapters, only_q)  # separate q_proj: fine
    gpt2_cfg, gpt2_base = models.from_pretrained(checkpoint("gpt2")[1])
    q_only = lora.init_adapters(gpt2_base, only_q, jax.random.key(0))
    with pytest.raises(ValueError, match="share one HF module"):
        peft_io.save_peft(str(tmp_path / "fused"), gpt2_cfg, q_only, only_q)
    assert not (tmp_path / "fused").exists()
    path = tmp_path / "ok" / peft_io.CONFIG_FILE
    cfg_json = json.loads(path.read_text())
    with pytest.raises(ValueError, match="does not adapt: base_model.model.model.layers.0"):
        peft_io.load_peft(str(tmp_path / "ok"), gpt2_cfg)  # a Llama adapter for a GPT-2
    path.write_text(json.dumps({**cfg_json, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        peft_io.load_peft(str(tmp_path / "ok"), cfg)
