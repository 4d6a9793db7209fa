"""Quantized kernels of every layout the decoder has (`models.quant`, `lora.quantize_base`),
against NumPy written from `models.quant`'s definitions:

- int8: one scale per OUTPUT channel, `s_j = max_i |w[i, j]| / 127` over ALL input axes (the
  attention output kernel [H, Dh, D] has two, so its scale is [D]; q/k/v [D, heads, Dh] have one,
  so theirs is [heads, Dh]); codes `round(w / s)`; dequantized within half a step;
- NF4: the kernel flattened row-major into blocks of 64, each scaled by its absmax, the nearest of
  the 16 levels, two codes per byte along the last axis (high nibble first), for kernels of rank 2
  and 3;
- `quantize_base` quantizes exactly the projections and leaves every other leaf as it was;
  `quantized_bytes` is what the leaves hold.
"""

import functools

import jax
import numpy as np
import pytest

from rlhf_jax import lora, models
from rlhf_jax.models import quant

# Input axes of each projection's kernel [*in, *out] (models.attention / layers): the output
# projection contracts heads and head_dim, the others one axis.
IN_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
# GPT-2-like (plain MLP, biases, q/k/v of 4 heads) and Llama-like (gated MLP, GQA: k/v of 2
# heads, an untied LM head).
CONFIGS = {
    "tiny": models.get_config("tiny", vocab_size=64, max_len=16, n_layers=1),
    "llama-tiny": models.get_config("llama-tiny", vocab_size=64, max_len=16, n_layers=1),
}


@functools.cache
def _params(name):
    """Host params of the config's shapes: normal weights, each leaf with its own spread."""
    shapes = jax.eval_shape(lambda: models.init_params(CONFIGS[name], jax.random.key(0)))
    rs = np.random.RandomState(0)
    return jax.tree.map(
        lambda s: (rs.normal(size=s.shape) * rs.uniform(0.1, 2, size=s.shape[-1:])).astype(
            np.float32
        ),
        shapes,
    )


def _projections(params):
    """{"layers_0/attn/q": kernel, ...}: every kernel under attn/ or mlp/."""
    out = {}
    for i in range(sum(k.startswith("layers_") for k in params)):
        for part in ("attn", "mlp"):
            for name, module in params[f"layers_{i}"][part].items():
                if "kernel" in module:
                    out[f"layers_{i}/{part}/{name}"] = module["kernel"]
    return out


def _node(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _int8_reference(w, n_in):
    scale = np.abs(w).max(axis=tuple(range(n_in))) / 127.0  # [*out]
    codes = np.clip(np.round(w / np.where(scale > 0, scale, 1.0)), -127, 127)
    return codes.astype(np.int8), scale.astype(np.float32)


def _nf4_reference(w):
    blocks = w.reshape(-1, 64)  # row-major
    absmax = np.abs(blocks).max(axis=1)
    normed = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    idx = np.abs(normed[..., None] - quant.NF4_LEVELS).argmin(axis=-1).reshape(-1)
    packed = ((idx[0::2] << 4) | idx[1::2]).astype(np.uint8)
    values = (quant.NF4_LEVELS[idx].reshape(-1, 64) * absmax[:, None]).reshape(w.shape)
    return packed.reshape(*w.shape[:-1], w.shape[-1] // 2), absmax, values


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_int8_base_has_one_scale_per_output_channel_of_every_projection(family):
    params = _params(family)
    qbase = lora.quantize_base(params, "int8")
    kernels = _projections(params)
    assert {p.rsplit("/", 1)[-1] for p in kernels} >= {"q", "k", "v", "o", "up", "down"}
    for path, w in kernels.items():
        n_in = IN_AXES[path.rsplit("/", 1)[-1]]
        node = _node(qbase, path)
        assert set(node) - {"bias"} == {"kernel_int8", "kernel_scale"}, path
        codes, scale = _int8_reference(w, n_in)
        assert node["kernel_scale"].shape == w.shape[n_in:], path  # o: [D]; q/k/v: [heads, Dh]
        np.testing.assert_allclose(np.asarray(node["kernel_scale"]), scale, rtol=1e-6)
        assert node["kernel_int8"].dtype == np.int8 and node["kernel_int8"].shape == w.shape
        np.testing.assert_array_equal(np.asarray(node["kernel_int8"]), codes, err_msg=path)
        # The largest weight of each output channel maps to the end of the int8 range.
        reach = np.abs(np.asarray(node["kernel_int8"], np.int32)).max(axis=tuple(range(n_in)))
        assert np.all(reach == 127), path
        back = np.asarray(quant.dequantize_kernel(node))
        assert back.shape == w.shape
        assert np.all(np.abs(back - w) <= scale / 2 * (1 + 1e-5) + 1e-7), path


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_nf4_base_blocks_the_kernel_row_major_for_every_rank(family):
    params = _params(family)
    qbase = lora.quantize_base(params, "nf4")
    half_gap = np.diff(quant.NF4_LEVELS).max() / 2  # the farthest a value is from its level
    ranks = set()
    for path, w in _projections(params).items():
        ranks.add(w.ndim)
        node = _node(qbase, path)
        assert set(node) - {"bias"} == {"kernel_nf4", "kernel_absmax"}, path
        packed, absmax, values = _nf4_reference(w)
        assert node["kernel_nf4"].dtype == np.uint8
        assert node["kernel_nf4"].shape == (*w.shape[:-1], w.shape[-1] // 2), path
        np.testing.assert_array_equal(np.asarray(node["kernel_nf4"]), packed, err_msg=path)
        assert node["kernel_absmax"].shape == (w.size // 64,)
        np.testing.assert_allclose(np.asarray(node["kernel_absmax"]), absmax, rtol=1e-6)
        assert quant.kernel_shape(node) == w.shape
        back = np.asarray(quant.dequantize_kernel(node))
        np.testing.assert_allclose(back, values, rtol=1e-6, atol=1e-7, err_msg=path)
        bound = np.repeat(absmax, 64).reshape(w.shape) * half_gap
        assert np.all(np.abs(back - w) <= bound * (1 + 1e-5) + 1e-7), path
    assert ranks == {2, 3}


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantize_base_touches_only_the_projections(mode):
    params = _params("llama-tiny")
    qbase = lora.quantize_base(params, mode)
    kernels = _projections(params)
    flat = dict(jax.tree_util.tree_flatten_with_path(qbase)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = "/".join(k.key for k in path)
        module = names.rsplit("/", 1)[0]
        if module in kernels and names.endswith("/kernel"):
            assert path not in flat, names  # replaced by its quantized leaves
        else:
            assert flat[path] is leaf, names  # embeddings, norms, the LM head: as they were
    back = lora.dequantize_base(qbase)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for path, w in kernels.items():
        assert _node(back, path)["kernel"].shape == w.shape


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_bytes_are_the_bytes_of_the_leaves(mode):
    for path, w in _projections(_params("llama-tiny")).items():
        n_in = IN_AXES[path.rsplit("/", 1)[-1]]
        leaves = quant.quantize_kernel(w, mode, n_in=n_in)
        held = sum(np.asarray(x).nbytes for x in leaves.values())
        assert quant.quantized_bytes(w.shape, mode, n_in) == held, path
