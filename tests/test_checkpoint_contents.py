"""What a checkpoint holds (`rlhf_jax.checkpoint`, `rlhf_jax.sweeps`): every leaf training
changes, and none of the frozen parts, listed from the saved folder by Orbax's own reader.

The contract (checkpoint.py, sweeps.py): a checkpoint holds the trained params, their optimizer
state, the step, the rng and the hyperparameters (a sweep: each stacked over the members, plus the
sweep's scalar step); the frozen parts (`frozen`, `ref_params`, `reward_params`, a sweep's
`"shared"`) are not written at all, and a restore takes them from the rerun's initial state. The
expected listing is built here from the states' own fields, not from the checkpoint code."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from rlhf_jax import checkpoint, lora, sweeps, train

S = 3  # sweep members


def _names(path):
    return "/".join(
        str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))) for k in path
    )


def _leaves(tree, prefix, lead=()):
    """{prefix/path: (shape with `lead` prepended, dtype)} of every array leaf of `tree`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(filter(None, [prefix, _names(path)]))
        out[name] = ((*lead, *np.shape(leaf)), np.dtype(leaf.dtype).name)
    return out


def _saved(workdir, step):
    """The listing of the checkpoint's state item, read back without any target."""
    folder = os.fspath(workdir / "checkpoints" / str(step) / "state")
    return _leaves(ocp.StandardCheckpointer().restore(folder), "")


def _save(workdir, step, state):
    with checkpoint.Checkpointer(workdir, save_every=1, async_save=False) as ckpt:
        assert ckpt.maybe_save(step, state)


def _params(seed, scale=1.0):
    rs = np.random.RandomState(seed)
    return {
        "layers_0": {"w": rs.normal(size=(4, 3)).astype(np.float32) * scale},
        "b": rs.normal(size=(3,)).astype(np.float32),
    }


def _trained(member, fields, lead):
    want = {}
    for field in fields:
        prefix = "members/" + field if lead else field
        want.update(_leaves(getattr(member, field), prefix, lead))
    return want


TRAINED = ("params", "opt_state", "step", "rng", "hparams")


def test_a_beta_sweep_holds_the_stacked_trained_state_and_not_the_shared_reference(tmp_path):
    opt = optax.adam(0.1)
    ref = _params(1)
    states = [
        train.create_train_state(_params(0), opt, 7, frozen=ref, hparams={"beta": b})
        for b in (0.1, 0.5, 1.0)
    ]
    sweep = sweeps.stack_sweep(states)
    assert sweep["members"].frozen is None and sweep["shared"]["frozen"] is states[0].frozen
    # "Trained": every leaf of the members moved (params, moments, step, rng, beta), so that a
    # restore can only get them from the checkpoint.
    trained = dict(
        sweep, step=jnp.int32(4), members=jax.tree.map(lambda x: x + 1, sweep["members"])
    )
    _save(tmp_path, 4, trained)
    want = _trained(states[0], TRAINED, (S,))
    want["step"] = ((), "int32")
    assert _saved(tmp_path, 4) == want  # no "shared", no "frozen", every trained leaf

    # Restored into the rerun's initial sweep: the trained leaves from the checkpoint, the
    # shared reference from that sweep (the same arrays).
    template = sweeps.stack_sweep(states)
    with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
        step, got, _, _ = ckpt.restore_latest(template)
    assert step == 4 and int(got["step"]) == 4
    assert got["shared"]["frozen"] is template["shared"]["frozen"]
    for a, b in zip(jax.tree.leaves(got["members"]), jax.tree.leaves(trained["members"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(got["members"].hparams["beta"], np.float32([1.1, 1.5, 2.0]))


def test_members_with_their_own_references_keep_them_and_the_checkpoint_holds_none(tmp_path):
    opt = optax.sgd(0.1, momentum=0.9)
    refs = [_params(10 + i) for i in range(S)]
    states = [
        train.create_train_state(_params(0), opt, 0, frozen=r, hparams={"beta": 0.1}) for r in refs
    ]
    sweep = sweeps.stack_sweep(states)
    assert "shared" not in sweep  # different references: each member keeps its own
    for i, r in enumerate(refs):
        got = sweeps.sweep_member(sweep, i).frozen
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(r)):
            np.testing.assert_array_equal(np.asarray(a), b)
    _save(tmp_path, 1, sweep)
    want = _trained(states[0], TRAINED, (S,))
    want["step"] = ((), "int32")
    assert _saved(tmp_path, 1) == want


def test_a_kl_sweep_of_ppo_holds_policy_critic_and_kl_coef_not_reference_or_reward(tmp_path):
    opt = optax.adam(0.1)
    reward = {"transformer": _params(3), "head": {"kernel": np.ones((3, 1), np.float32)}}

    def state(kl_coef):
        return train.create_ppo_state(
            train.PPOConfig(kl_coef=kl_coef),
            policy_params=_params(0),
            value_params={"trunk": _params(2), "head": np.zeros((3,), np.float32)},
            ref_params=_params(1),
            reward_params=reward,
            policy_optimizer=opt,
            value_optimizer=opt,
            rng=0,
        )

    states = [state(k) for k in (0.01, 0.05, 0.2)]
    sweep = sweeps.stack_sweep(states)
    assert set(sweep["shared"]) == {"ref_params", "reward_params"}
    _save(tmp_path, 2, sweep)
    fields = (
        "policy_params", "policy_opt_state", "value_params", "value_opt_state", "kl_coef",
        "step", "rng",
    )  # fmt: skip
    want = _trained(states[0], fields, (S,))
    want["step"] = ((), "int32")
    assert _saved(tmp_path, 2) == want


def test_a_single_ppo_state_holds_no_reference_or_reward_model(tmp_path):
    opt = optax.sgd(0.1)
    state = train.create_ppo_state(
        train.PPOConfig(),
        policy_params=_params(0),
        value_params=_params(2),
        ref_params=_params(1),
        reward_params=_params(3),
        policy_optimizer=opt,
        value_optimizer=opt,
        rng=0,
    )
    _save(tmp_path, 1, state)
    fields = (
        "policy_params", "policy_opt_state", "value_params", "value_opt_state", "kl_coef",
        "step", "rng",
    )  # fmt: skip
    assert _saved(tmp_path, 1) == _trained(state, fields, ())


def test_a_qlora_run_holds_the_adapters_and_not_the_frozen_base(tmp_path, tiny_params):
    cfg = lora.LoraConfig(rank=2)
    adapters, base = lora.prepare(tiny_params, cfg, jax.random.key(1), quantize="int8")
    opt = optax.adamw(1e-3)
    state = train.create_train_state(adapters, opt, 0, frozen={"base": base}, hparams={"beta": 0.1})
    _save(tmp_path, 5, state)
    saved = _saved(tmp_path, 5)
    assert saved == _trained(state, TRAINED, ())
    # Every adapted projection's A and B (the tiny decoder: one layer, a plain MLP), nothing of
    # the (quantized) base.
    modules = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down")
    names = {n for n in saved if n.startswith("params/")}
    assert names == {f"params/layers_0/{m}/{x}" for m in modules for x in ("a", "b")}
    assert not any("kernel" in n for n in saved)
