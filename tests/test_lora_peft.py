"""LoRA interchange with the PyTorch world, against the real `peft` and `transformers` packages.

- our adapters saved in PEFT's format load onto the transformers model with `PeftModel` and give
  our adapted logits (families with separate projections, GPT-2's fused Conv1D `c_attn` and
  GPT-NeoX's head-interleaved `query_key_value`);
- an adapter PEFT wrote (random A and B, a per-module rank, rsLoRA scaling) loads into ours with
  PEFT's logits;
- the merged model exported with `save_pretrained` is a plain HF folder whose transformers logits
  are the adapted model's;
- without PyTorch: every `LoraConfig` field (rank, alpha, dropout, the targeted projections)
  survives save -> load, and a hand-written PEFT folder (rsLoRA or not, per-module rank and
  alpha) loads with PEFT's update `s B A`, its dropout reaching the model.
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


# --- adapter_config.json <-> LoraConfig, without PyTorch: written and read back by hand -------

TINY_FAMILIES = {
    "llama": models.get_config("llama-tiny", vocab_size=64, max_len=16, n_layers=2),
    "gpt2": models.get_config("tiny", vocab_size=64, max_len=16, n_layers=2),
}


def _effective(adapters, lora_cfg):
    """{module path: (alpha / r) B A} as our kernel-shaped arrays, in NumPy."""
    out = {}
    for path, node in _adapter_nodes(adapters):
        a, b = np.asarray(node["a"], np.float64), np.asarray(node["b"], np.float64)
        out[path] = lora_cfg.scale * np.tensordot(a, b, axes=1)
    return out


def _adapter_nodes(tree, prefix=()):
    if set(tree) == {"a", "b"}:
        yield "/".join(prefix), tree
        return
    for key, sub in tree.items():
        yield from _adapter_nodes(sub, (*prefix, key))


@pytest.mark.parametrize(
    "family, lora_cfg, hf_targets, rank_pattern",
    [
        ("llama", lora.LoraConfig(rank=3, alpha=5.0, dropout=0.05, targets=r"attn/(q|v)$"),
         ["q_proj", "v_proj"], {}),
        ("llama", lora.LoraConfig(rank=2, alpha=7.0, targets=r"layers_1/mlp/(up|down)$"),
         ["down_proj", "up_proj"], {}),
        ("gpt2", lora.LoraConfig(rank=2, alpha=7.0, dropout=0.1),  # fused q/k/v: rank 3r
         ["c_attn", "c_fc", "c_proj"], {"c_attn": 6}),
    ],
)  # fmt: skip
def test_every_lora_config_field_survives_save_and_load(
    family, lora_cfg, hf_targets, rank_pattern, tmp_path
):
    cfg = TINY_FAMILIES[family]
    base = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    adapters = lora.init_adapters(base, lora_cfg, jax.random.key(1))
    rs = np.random.RandomState(0)
    adapters = jax.tree.map(lambda x: np.asarray(x) + rs.normal(size=x.shape) * 0.3, adapters)
    peft_io.save_peft(str(tmp_path), cfg, adapters, lora_cfg)
    written = json.loads((tmp_path / peft_io.CONFIG_FILE).read_text())
    assert (written["r"], written["lora_alpha"], written["lora_dropout"]) == (
        lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout,
    )  # fmt: skip
    assert written["target_modules"] == hf_targets and written["use_rslora"] is False
    assert written["rank_pattern"] == rank_pattern
    # The same scale alpha / r for a fused module of rank 3r: alpha_pattern 3 alpha.
    assert written["alpha_pattern"] == {k: lora_cfg.alpha * v / lora_cfg.rank
                                        for k, v in rank_pattern.items()}  # fmt: skip

    back, back_cfg = peft_io.load_peft(str(tmp_path), cfg)
    assert (back_cfg.rank, back_cfg.alpha, back_cfg.dropout) == (
        lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout,
    )  # fmt: skip
    # The loaded targets select exactly the projections that were adapted, here and under a
    # reward model's trunk.
    assert lora.target_modules(base, back_cfg) == lora.target_modules(base, lora_cfg)
    trunk = {"transformer": base, "head": {"kernel": np.zeros((cfg.d_model, 1))}}
    assert lora.target_modules(trunk, back_cfg) == lora.target_modules(trunk, lora_cfg)
    want, got = _effective(adapters, lora_cfg), _effective(back, back_cfg)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("use_rslora", [True, False])
def test_a_hand_written_peft_folder_loads_with_its_scales(use_rslora, tmp_path):
    """PEFT's update of a module is s B A with s = alpha / r, or alpha / sqrt(r) with rsLoRA,
    alpha and r the module's own (alpha_pattern, rank_pattern); B [out, r], A [r, in]."""
    from safetensors.numpy import save_file

    cfg = TINY_FAMILIES["llama"]
    d, h, dh, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    rs = np.random.RandomState(2)
    prefix = "base_model.model.model.layers.0."
    modules = {  # HF module: (rank, alpha, in features, out features, our kernel's shape)
        "self_attn.q_proj": (4, 6.0, d, h * dh, (d, h, dh)),
        "mlp.up_proj": (2, 3.0, d, f, (d, f)),
    }
    tensors, want = {}, {}
    for name, (r, alpha, n_in, n_out, shape) in modules.items():
        a = rs.normal(size=(r, n_in)).astype(np.float32)
        b = rs.normal(size=(n_out, r)).astype(np.float32)
        tensors[f"{prefix}{name}.lora_A.weight"] = a
        tensors[f"{prefix}{name}.lora_B.weight"] = b
        s = alpha / (np.sqrt(r) if use_rslora else r)
        want[name] = (s * (b.astype(np.float64) @ a)).T.reshape(shape)  # [in, out] kernels
    save_file(tensors, str(tmp_path / peft_io.WEIGHTS_FILE))
    (tmp_path / peft_io.CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 6.0, "lora_dropout": 0.1,
        "target_modules": ["q_proj", "up_proj"], "rank_pattern": {"up_proj": 2},
        "alpha_pattern": {"up_proj": 3.0}, "use_rslora": use_rslora, "bias": "none",
    }))  # fmt: skip

    adapters, lora_cfg = peft_io.load_peft(str(tmp_path), cfg)
    assert (lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout) == (4, 6.0, 0.1)
    got = _effective(adapters, lora_cfg)
    assert set(got) == {"layers_0/attn/q", "layers_0/mlp/up"}
    for ours, name in (("layers_0/attn/q", "self_attn.q_proj"), ("layers_0/mlp/up", "mlp.up_proj")):
        np.testing.assert_allclose(got[ours], want[name], rtol=1e-5, atol=1e-6, err_msg=ours)
    base = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    assert lora.target_modules(base, lora_cfg) == [
        ("layers_0", "attn", "q"),
        ("layers_0", "mlp", "up"),
    ]
    # The loaded dropout is the model's: it reaches the adapters' collection, and the on-policy
    # methods refuse the adapter.
    assert float(lora.lora_collection(adapters, lora_cfg)["layers_0"]["attn"]["q"]["dropout"]) == (
        pytest.approx(0.1)
    )
    with pytest.raises(ValueError, match="LoRA dropout 0.1"):
        lora.check_no_dropout(lora.LoraTransformer(cfg, lora_cfg), "PPO")
