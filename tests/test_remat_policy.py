"""`TransformerConfig.remat` reaches `jax.checkpoint`: the forward's jaxpr (unrolled and with
`scan_layers`) holds one checkpoint per decoder block (per layer group inside the scan) with the
chosen policy, and none with remat="none". The numbers are the same under every policy by
design, so only the program shows whether the choice was applied."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from helpers import tiny_lm

from rlhf_jax import lora, models

# The name of `jax.checkpoint`'s primitive: "remat2" on jax 0.10, "checkpoint" later.
_CHECKPOINT = ("checkpoint", "remat2", "remat")
_POLICIES = {
    "full": None,  # keep nothing but the block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _checkpoints(jaxpr, inside_scan=False):
    """(policy, inside a scan) of every checkpoint equation, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _CHECKPOINT:
            found.append((eqn.params["policy"], inside_scan))
        in_scan = inside_scan or eqn.primitive.name == "scan"
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _checkpoints(sub.jaxpr, in_scan)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _checkpoints(sub, in_scan)
    return found


def _forward_checkpoints(cfg, model_cls=models.Transformer, wrap=lambda p: p):
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    tokens = jnp.zeros((2, 8), jnp.int32)
    model = model_cls(cfg)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": wrap(p)}, tokens))(params)
    return _checkpoints(jaxpr.jaxpr)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_remat_policy_reaches_jax_checkpoint(remat, scan_layers):
    cfg = dataclasses.replace(
        tiny_lm.config(n_layers=3), remat=remat, scan_layers=scan_layers
    )  # 3 layers of period 1: three checkpoints unrolled, one inside the scan's body
    found = _forward_checkpoints(cfg)
    if remat == "none":
        assert found == []
        return
    want_count = 1 if scan_layers else cfg.n_layers
    assert len(found) == want_count, found
    for policy, inside_scan in found:
        assert policy == _POLICIES[remat], (policy, remat)
        assert inside_scan == scan_layers


def test_boolean_remat_means_full_and_the_adapted_model_keeps_the_policy():
    cfg = dataclasses.replace(tiny_lm.config(n_layers=2), remat=True)
    assert cfg.remat == "full"
    assert [p for p, _ in _forward_checkpoints(cfg)] == [None, None]
    cfg = dataclasses.replace(cfg, remat="dots")
    lora_cfg = lora.LoraConfig(rank=2)

    def adapted(p):
        return {"base": p, "lora": lora.init_adapters(p, lora_cfg, jax.random.key(1))}

    found = _forward_checkpoints(cfg, lambda c: lora.LoraTransformer(c, lora_cfg), wrap=adapted)
    assert [p for p, _ in found] == [_POLICIES["dots"]] * 2
