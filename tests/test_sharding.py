"""Tests for rlhf_jax.sharding on 8 forced CPU devices (see conftest.py).

The mesh-equivalence test compares a real optax step of a tiny GPT-2-named transformer on meshes
(8,1,1), (2,4,1), (2,2,2) with plain single-device `jax.jit`, three steps, to 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import toy_steps
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import distributed, models, sharding
from rlhf_jax.train.logps import target_logps

# --------------------------------------------------------------------------------------------
# Mesh factory and checks


def test_parse_mesh_spec():
    assert sharding.parse_mesh_spec("data=2,fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.parse_mesh_spec(" fsdp = 2 ") == {"fsdp": 2}
    assert sharding.parse_mesh_spec("") == {}
    for bad in ["data=2,model=4", "data", "data=two", "data=2,data=4"]:
        with pytest.raises(ValueError, match="mesh spec"):
            sharding.parse_mesh_spec(bad)


def test_make_mesh_shapes_and_axis_types():
    mesh = sharding.make_mesh(**sharding.parse_mesh_spec("data=2,fsdp=2,tensor=2"))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh(fsdp=4).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(sharding.make_mesh(1, -1, 2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    one = sharding.make_mesh(devices=jax.devices()[:1])
    assert one.devices.size == 1


def test_make_mesh_errors_say_what_to_change():
    msg = (
        "mesh data=3,fsdp=1,tensor=1 needs 3 devices but 8 are available; "
        "choose axis sizes whose product is 8"
    )
    with pytest.raises(ValueError, match=msg):
        sharding.make_mesh(3, 1, 1)
    with pytest.raises(ValueError, match="choose axis sizes whose product is 8"):
        sharding.make_mesh(-1, 3, 1)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh(-1, -1, 1)


def test_check_batch_divisible():
    mesh = sharding.make_mesh(2, 2, 2)
    sharding.check_batch_divisible(12, mesh)
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by data x fsdp = 2 x 2"):
        sharding.check_batch_divisible(6, mesh)
    with pytest.raises(ValueError, match="batch size 6"):
        sharding.shard_batch({"x": np.zeros((6, 3))}, mesh)


# --------------------------------------------------------------------------------------------
# Partition rules


def _fake_gpt2(vocab=64, max_len=16, d=8, n_layers=2, heads=2):
    """Zero GPT-2 params with the real decoder's names and shapes (no init compiled)."""
    cfg = models.TransformerConfig(
        vocab_size=vocab, max_len=max_len, d_model=d, n_layers=n_layers, n_heads=heads
    )
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)


def _by_path(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
    return {sharding.path_str(path): leaf for path, leaf in flat}


EXPECTED_GPT2 = {
    "embed/embedding": P("tensor", "fsdp"),
    "pos_embed/embedding": P(None, "fsdp"),
    "final_norm/scale": P(),
    "final_norm/bias": P(),
    "layers_1/attn_norm/scale": P(),
    "layers_1/attn/q/kernel": P("fsdp", "tensor"),  # [D, H, Dh]: whole heads per shard
    "layers_1/attn/k/kernel": P("fsdp", "tensor"),
    "layers_1/attn/v/bias": P("tensor"),  # [H, Dh]
    "layers_1/attn/o/kernel": P("tensor", None, "fsdp"),  # [H, Dh, D]
    "layers_1/attn/o/bias": P(),
    "layers_1/mlp/up/kernel": P("fsdp", "tensor"),
    "layers_1/mlp/up/bias": P("tensor"),
    "layers_1/mlp/down/kernel": P("tensor", "fsdp"),
    "layers_1/mlp/down/bias": P(),
}


def test_partition_specs_gpt2_names():
    mesh = sharding.make_mesh(2, 2, 2)
    specs = _by_path(sharding.param_partition_specs(_fake_gpt2(), mesh))
    for name, spec in EXPECTED_GPT2.items():
        assert specs[name] == spec, name
    assert specs["layers_0/attn/q/kernel"] == P("fsdp", "tensor")
    # Under a prefix (reward backbone, frozen reference) the same rules apply; heads replicate.
    rm = {"transformer": _fake_gpt2(), "head": {"kernel": np.zeros((8, 1)), "bias": np.zeros(1)}}
    rm_specs = _by_path(sharding.param_partition_specs(rm, mesh))
    assert rm_specs["transformer/layers_0/mlp/up/kernel"] == P("fsdp", "tensor")
    assert rm_specs["head/kernel"] == P() and rm_specs["head/bias"] == P()


def test_partition_specs_drop_axes_that_do_not_divide():
    mesh = sharding.make_mesh(1, 2, 4)
    specs = _by_path(sharding.param_partition_specs(_fake_gpt2(vocab=66, d=6, heads=3), mesh))
    assert specs["embed/embedding"] == P(None, "fsdp")  # 66 % 4 != 0, 6 % 2 == 0
    assert specs["layers_0/attn/q/kernel"] == P("fsdp")  # [6, 3, 2]: 3 heads % 4 != 0
    assert specs["layers_0/mlp/up/kernel"] == P("fsdp", "tensor")  # [6, 24]
    # Without a mesh nothing is dropped; stacked leading dims stay unsharded.
    stacked = {"h/attn/q/kernel": np.zeros((3, 6, 4, 2))}
    assert _by_path(sharding.param_partition_specs(stacked))["h/attn/q/kernel"] == P(
        None, "fsdp", "tensor"
    )
    # Every fitted spec can actually place its array.
    fake = _fake_gpt2(vocab=66, d=6, heads=3)
    for leaf, sh in zip(
        jax.tree.leaves(fake), jax.tree.leaves(sharding.state_shardings(mesh, fake))
    ):
        jax.device_put(leaf, sh)


@pytest.mark.parametrize(
    "name", ["tiny", "llama-tiny", "gemma2-tiny", "qwen2.5-7b", "llama-3.1-8b", "pythia-2.8b"]
)
def test_tensor_split_is_head_aligned(name):
    """On a tensor axis of 2 (and 4), every q/k/v/o shard holds whole heads: the head axis is the
    one split (when the head count allows), never Dh or the fused width. GQA kv heads split when
    their count divides the axis, else stay replicated."""
    cfg = models.get_config(name)
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    for tensor in (2, 4):
        mesh = sharding.make_mesh(8 // tensor, 1, tensor)
        specs = _by_path(sharding.param_partition_specs(params, mesh))
        for layer in range(cfg.n_layers):
            attn = f"layers_{layer}/attn"
            for proj, heads in [("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)]:
                spec = tuple(specs[f"{attn}/{proj}/kernel"]) + (None,) * 3
                assert spec[2] is None  # Dh is never split
                assert spec[1] == ("tensor" if heads % tensor == 0 else None), (proj, spec)
            o = tuple(specs[f"{attn}/o/kernel"]) + (None,) * 3
            assert o[0] == ("tensor" if cfg.n_heads % tensor == 0 else None) and o[1] is None


def _assert_opt_state_mirrors_params(state_sh, params_key="params", opt_key="opt_state"):
    by_path = {path: s.spec for path, s in _by_path(state_sh).items()}
    params = {p[len(params_key) + 1 :]: s for p, s in by_path.items() if p.startswith(params_key)}
    n_moments = 0
    for path, spec in by_path.items():
        if not path.startswith(opt_key):
            continue
        owners = [name for name in params if path.endswith("/" + name)]
        if owners:
            n_moments += 1
            assert spec == params[max(owners, key=len)], path
        else:
            assert spec == P(), path  # counts and other scalars
    assert n_moments >= 2 * len(params)  # adam's mu and nu


def test_state_shardings_optimizer_mirrors_params():
    mesh = sharding.make_mesh(2, 2, 2)
    params = _fake_gpt2()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(0),
        "ref_params": params,
    }
    shardings = sharding.state_shardings(mesh, state)
    _assert_opt_state_mirrors_params(shardings)
    assert shardings["step"].spec == P() and shardings["rng"].spec == P()
    assert shardings["ref_params"]["embed"]["embedding"].spec == P("tensor", "fsdp")
    # Abstract states (jax.eval_shape) give the same shardings.
    abstract = jax.eval_shape(lambda: state)
    assert sharding.state_shardings(mesh, abstract) == shardings


def test_rules_on_the_real_model_if_present():
    cfg = models.get_config("tiny")
    params = jax.eval_shape(lambda key: models.init_params(cfg, key), jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(2, 2, 2)
    specs = _by_path(sharding.param_partition_specs(params, mesh))
    for name, spec in EXPECTED_GPT2.items():
        assert specs.get(name, "missing") == spec, name
    try:
        from rlhf_jax.train.state import create_train_state, make_optimizer
    except ImportError:
        return
    state = jax.eval_shape(
        lambda p: create_train_state(p, make_optimizer(1e-3), 0, frozen=p), params
    )
    _assert_opt_state_mirrors_params(sharding.state_shardings(mesh, state))


# --------------------------------------------------------------------------------------------
# Batches and the compiled step


def test_shard_batch_and_rows_single_process():
    mesh = sharding.make_mesh(2, 2, 2)
    np.testing.assert_array_equal(sharding.process_batch_rows(8, mesh), np.arange(8))
    batch = toy_steps.make_batch(0)
    sharded = sharding.shard_batch(batch, mesh)
    assert sharded["tokens"].sharding == sharding.batch_sharding(mesh)
    assert sharded["tokens"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(sharded["tokens"]), batch["tokens"])


@pytest.fixture(scope="module")
def single_device_run():
    """Three steps of the toy model under plain single-device jit: the reference."""
    state = toy_steps.init_state(0)
    batches = [toy_steps.make_batch(i) for i in range(3)]
    step = jax.jit(toy_steps.train_step)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return batches, losses, jax.tree.map(np.asarray, state)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_step_matches_single_device(shape, single_device_run):
    batches, ref_losses, ref_state = single_device_run
    mesh = sharding.make_mesh(*shape)
    host_state = toy_steps.init_state(0)
    state = sharding.shard_state(host_state, mesh)
    expected = sharding.state_shardings(mesh, state)
    assert jax.tree.map(lambda x: x.sharding, state) == expected
    if shape == (2, 2, 2):
        kernel = state["params"]["layers_0"]["mlp"]["up"]["kernel"]
        assert kernel.addressable_shards[0].data.shape == (16 // 2, 64 // 2)
    train_step = sharding.compile_step(toy_steps.train_step, mesh, state, batches[0])

    losses = []
    for i, batch in enumerate(batches):
        before = state
        state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
        if i == 0:  # donation: the input buffers are gone, the output keeps the layouts
            assert all(x.is_deleted() for x in jax.tree.leaves(before))
            assert jax.tree.map(lambda x: x.sharding, state) == expected
            assert set(metrics) == {"loss", "grad_norm", "update_norm"}
            assert metrics["loss"].sharding.is_fully_replicated
        losses.append(float(metrics["loss"]))

    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-5)
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(ref_state)
    ):
        np.testing.assert_allclose(
            np.asarray(got), want, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path)
        )
    # The caller's host state is untouched by donation.
    assert np.asarray(host_state["step"]) == 0
    # Ahead-of-time compiled: another batch shape is an error, never a silent recompilation.
    with pytest.raises((TypeError, ValueError)):
        train_step(state, toy_steps.make_batch(0, batch_size=16))


def test_compile_step_without_donation_keeps_inputs():
    mesh = sharding.make_mesh(8, 1, 1)
    state = sharding.shard_state({"w": np.ones(4, np.float32)}, mesh)

    def step(s, b):
        w = s["w"] - b["x"].mean(0)
        return {"w": w}, {"loss": jnp.sum(w**2)}

    batch = {"x": np.ones((8, 4), np.float32)}
    compiled = sharding.compile_step(step, mesh, state, batch, donate_state=False)
    new, metrics = compiled(state, batch)  # a host batch is accepted on one process
    assert not state["w"].is_deleted()
    np.testing.assert_array_equal(np.asarray(new["w"]), np.zeros(4))
    assert float(metrics["loss"]) == 0.0
    assert isinstance(new["w"].sharding, NamedSharding)


def test_batch_output_feeds_the_next_compiled_step():
    """A rollout-like step whose second output is a batch for the next step (PPO's pattern)."""
    mesh = sharding.make_mesh(2, 2, 2)
    state = sharding.shard_state({"w": np.full(3, 2.0, np.float32)}, mesh)
    batch = sharding.shard_batch({"x": np.arange(24, dtype=np.float32).reshape(8, 3)}, mesh)

    def rollout(s, b):
        return s, {"y": b["x"] * s["w"], "total": jnp.sum(b["x"])}  # [B, 3], scalar

    def update(s, ro):
        return {"w": s["w"] + ro["y"].mean(0)}, {"loss": ro["total"]}

    compiled_rollout = sharding.compile_step(rollout, mesh, state, batch, batch_output=True)
    state, ro = compiled_rollout(state, batch)
    assert ro["y"].sharding == sharding.batch_sharding(mesh)
    assert ro["total"].sharding.is_fully_replicated
    state, metrics = sharding.compile_step(update, mesh, state, ro)(state, ro)
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    np.testing.assert_allclose(np.asarray(state["w"]), 2.0 + (2.0 * x).mean(0), rtol=1e-6)
    assert float(metrics["loss"]) == x.sum()


def test_init_distributed_single_process_is_a_noop(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_distributed() is False
    assert distributed.is_primary()
    with pytest.raises(ValueError, match="coordinator"):
        distributed.init_distributed(num_processes=2, process_id=0)


# --------------------------------------------------------------------------------------------
# Constraints inside a step, and this host's rows / whole arrays


def test_constrain_pins_the_dims_that_split_and_is_a_noop_without_a_mesh():
    x = jnp.arange(8 * 6 * 4, dtype=jnp.float32).reshape(8, 6, 4)
    assert sharding.constrain(x, sharding.BATCH_AXES) is x  # no mesh set: untouched
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)

    def f(a, b):
        return (
            sharding.constrain(a * 2, sharding.BATCH_AXES, None, "tensor"),
            sharding.constrain(b * 2, sharding.BATCH_AXES, "tensor"),  # 6 rows: data x fsdp = 4
            sharding.constrain_rows({"a": a + 1, "s": jnp.sum(a)}),
        )

    with jax.set_mesh(mesh):
        out, odd, rows = jax.jit(f)(x, x[:6])
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
    assert odd.sharding.spec == P("data", "tensor")  # fsdp, which would not divide 6, dropped
    assert rows["a"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x))
    np.testing.assert_array_equal(np.asarray(odd), 2 * np.asarray(x[:6]))
    np.testing.assert_array_equal(np.asarray(rows["a"]), np.asarray(x) + 1)


def test_local_rows_and_to_host_on_one_process_are_the_whole_arrays():
    """One process holds every row (the several-host case runs in tests/test_multihost_drivers.py:
    each host scores its own rollout rows, and hand-overs gather FSDP-split parameters)."""
    mesh = sharding.make_mesh(data=2, fsdp=4)
    host = {"tokens": np.arange(16 * 3).reshape(16, 3), "w": np.ones((4, 8), np.float32)}
    batch = sharding.shard_batch({"tokens": host["tokens"]}, mesh)
    np.testing.assert_array_equal(distributed.local_rows(batch)["tokens"], host["tokens"])
    params = sharding.shard_state({"w": host["w"]}, mesh)
    got = distributed.to_host(params)
    assert isinstance(got["w"], np.ndarray)
    np.testing.assert_array_equal(got["w"], host["w"])


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "lm_head"])
def test_vocab_parallel_chunks_equal_the_unsharded_log_probs_and_gradients(tie):
    """`train.logps.target_logps` in chunks on data=2, fsdp=2, tensor=2 (the output layer split over
    the vocabulary inside each chunk, `sharding.vocab_parallel`) against the same function without
    a mesh: log-probs, argmax hits, entropies and the gradient of a loss through them."""
    cfg = models.TransformerConfig(vocab_size=96, max_len=16, d_model=16, n_layers=1, n_heads=2,
                                   tie_embeddings=tie, logits_chunk=4)  # fmt: skip
    model = models.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 11), 0, cfg.vocab_size)
    mask = jnp.ones_like(tokens).at[:4, 8:].set(0)
    params = model.init(jax.random.key(0), tokens[:, :4])

    def f(p):
        logps, hit, ent = target_logps(model, p["params"], tokens, mask)
        return jnp.sum(logps * jnp.cos(ent)), (logps, hit, ent)

    want = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(f, has_aux=True))(sharding.shard_state(params, mesh))
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_vocab_parallel_splits_logit_rows_over_what_the_vocabulary_does_not_use():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)

    def specs(vocab):
        xs = {"weight": jnp.ones((16, vocab)), "logits": jnp.ones((8, 4, vocab))}
        with jax.set_mesh(mesh):
            out = jax.jit(
                lambda xs: {
                    k: sharding.vocab_parallel(k, x, vocab_size=vocab) for k, x in xs.items()
                }
            )(xs)
        return {k: x.sharding.spec for k, x in out.items()}

    both = ("fsdp", "tensor")
    assert specs(96) == {
        "weight": P(None, both),
        "logits": P("data", None, both),
    }
    # 98 = 2 x 49: fsdp splits the vocabulary, tensor cannot; the rows are gathered over fsdp.
    assert specs(98) == {
        "weight": P(None, "fsdp"),
        "logits": P("data", None, "fsdp"),
    }
    # 99: no axis splits the vocabulary; the rows stay split as the batch is.
    assert specs(99) == {
        "weight": P(),
        "logits": P(("data", "fsdp")),
    }
    with pytest.raises(ValueError, match="kind must be"), jax.set_mesh(mesh):
        sharding.vocab_parallel("hidden", jnp.ones(4), vocab_size=96)
