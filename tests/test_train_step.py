"""The one step contract (`train.make_step`), the open loss tables and the host checks of traced
hyperparameters: a user's loss trains exactly like the built-in ones."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.batches import preference_batch

from rlhf_jax import losses
from rlhf_jax.train import (
    PPOConfig,
    TrainState,
    check_hparams,
    create_train_state,
    make_dpo_step,
    make_eval,
    make_step,
    paired_optimizer,
    stack_states,
)


def test_make_step_on_a_user_loss():
    """A quadratic loss to the contract: one SGD step is -lr x its gradient; frozen params and
    hyperparameters reach the loss; the metrics carry the loss, the norms and the user's own."""
    target = {"w": jnp.array([1.0, -2.0, 0.5])}
    params = {"w": jnp.zeros(3)}
    seen = {}

    def loss_fn(params, batch, *, frozen, hparams):
        seen["keys"] = (sorted(frozen), sorted(hparams))
        d = params["w"] - frozen["w"] * batch["x"]
        loss = hparams["scale"] * jnp.sum(d**2)
        return loss, {"max_abs": jnp.max(jnp.abs(d))}

    opt = optax.sgd(0.1)
    state = create_train_state(params, opt, 0, frozen=target, hparams={"scale": 2.0})
    batch = {"x": jnp.float32(3.0)}
    new, m = jax.jit(make_step(loss_fn, opt))(state, batch)
    grad = 2.0 * 2.0 * (0.0 - 3.0 * np.array([1.0, -2.0, 0.5]))  # d/dw scale * |w - 3 t|^2
    np.testing.assert_allclose(new.params["w"], -0.1 * grad, rtol=1e-6)
    np.testing.assert_allclose(m["loss"], 2.0 * 9.0 * 5.25, rtol=1e-6)
    np.testing.assert_allclose(m["max_abs"], 6.0)
    np.testing.assert_allclose(m["grad_norm"], np.linalg.norm(grad), rtol=1e-6)
    np.testing.assert_allclose(m["update_norm"], 0.1 * np.linalg.norm(grad), rtol=1e-6)
    assert int(new.step) == 1 and seen["keys"] == (["w"], ["scale"])
    np.testing.assert_array_equal(new.frozen["w"], target["w"])  # never trained
    ev = make_eval(loss_fn)(state, batch)
    assert set(ev) == {"loss", "max_abs"} and float(ev["loss"]) == pytest.approx(float(m["loss"]))


def test_paired_optimizer_updates_each_half_with_its_own_transformation():
    params = ({"a": jnp.ones(2)}, {"b": jnp.ones(3)})
    opt = paired_optimizer(optax.sgd(0.5), optax.sgd(0.1))

    def loss_fn(params, batch, *, frozen, hparams):
        return jnp.sum(params[0]["a"]) + 2.0 * jnp.sum(params[1]["b"]), {}

    groups = {"first": lambda p: p[0], "second": lambda p: p[1]}
    state = TrainState(params=params, opt_state=opt.init(params), step=jnp.int32(0), rng=None)
    new, m = make_step(loss_fn, opt, norm_groups=groups)(state, None)
    np.testing.assert_allclose(new.params[0]["a"], 1.0 - 0.5 * 1.0)
    np.testing.assert_allclose(new.params[1]["b"], 1.0 - 0.1 * 2.0)
    np.testing.assert_allclose(m["first_grad_norm"], np.sqrt(2.0), rtol=1e-6)
    np.testing.assert_allclose(m["second_grad_norm"], 2.0 * np.sqrt(3.0), rtol=1e-6)
    np.testing.assert_allclose(m["second_update_norm"], 0.2 * np.sqrt(3.0), rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], np.sqrt(2.0 + 12.0), rtol=1e-6)


def hand_sigmoid(pc, pr, rc, rr, *, beta):
    """DPO (Rafailov et al. 2023, Eq. 7) written to the pairwise-loss contract."""
    return -jax.nn.log_sigmoid(beta * ((pc - rc) - (pr - rr)))


def test_dpo_step_takes_a_loss_function_equal_to_the_builtin(
    tiny, tiny_config, tiny_model, tiny_params
):
    policy, ref = tiny_params, tiny(seed=1).params
    batch = preference_batch(0, 4, 10, tiny_config.vocab_size)
    opt = optax.sgd(0.5)
    runs = {}
    for name, loss in (("builtin", "sigmoid"), ("callable", hand_sigmoid)):
        state = create_train_state(
            jax.tree.map(jnp.copy, policy), opt, 0, frozen=ref, hparams={"beta": 0.3}
        )
        runs[name] = jax.jit(make_dpo_step(tiny_model, opt, loss_type=loss))(state, batch)
    (s1, m1), (s2, m2) = runs["builtin"], runs["callable"]
    assert set(m1) == set(m2)
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    def with_metrics(pc, pr, rc, rr, *, beta):  # (losses, per-example metrics) is accepted too
        out = hand_sigmoid(pc, pr, rc, rr, beta=beta)
        return out, {"my_margin": (pc - rc) - (pr - rr)}

    state = create_train_state(policy, opt, 0, frozen=ref, hparams={"beta": 0.3})
    _, m3 = jax.jit(make_dpo_step(tiny_model, opt, loss_type=with_metrics))(state, batch)
    np.testing.assert_allclose(m3["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m3["my_margin"], m1["rewards/margin"] / 0.3, rtol=1e-5)

    def doubled(pc, pr, rc, rr, *, beta):  # no built-in: twice the loss, twice the gradient
        return 2.0 * hand_sigmoid(pc, pr, rc, rr, beta=beta)

    _, m4 = jax.jit(make_dpo_step(tiny_model, opt, loss_type=doubled))(state, batch)
    np.testing.assert_allclose(m4["loss"], 2 * m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], 2 * m1["grad_norm"], rtol=1e-5)
    with pytest.raises(ValueError, match="accepted values"):
        make_dpo_step(tiny_model, opt, loss_type="dpo-positive")
    with pytest.raises(ValueError, match="bind it in your loss function"):
        make_dpo_step(tiny_model, opt, loss_type=hand_sigmoid, label_smoothing=0.1)


def test_pairwise_loss_table_is_open():
    args = [jnp.asarray(np.random.RandomState(0).normal(size=5), jnp.float32) for _ in range(4)]
    for name in losses.PAIRWISE_LOSSES:
        got, _ = losses.pairwise_loss(name, label_smoothing=0.1)(*args, beta=0.5)
        smoothing = 0.1 if name in ("sigmoid", "robust") else 0.0
        want, _ = losses.dpo_loss(*args, beta=0.5, loss_type=name, label_smoothing=smoothing)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    got, metrics = losses.pairwise_loss(hand_sigmoid)(*args, beta=0.5)
    np.testing.assert_allclose(got, losses.dpo_loss(*args, beta=0.5)[0], rtol=1e-6)
    assert metrics == {}


@pytest.mark.parametrize(
    "hparams,message",
    [
        ({"beta": -1.0}, r"hparams\['beta'\] must be > 0, got -1.0"),
        ({"beta": 0.0}, r"hparams\['beta'\] must be > 0"),
        ({"alpha": -0.1}, r"hparams\['alpha'\] must be >= 0"),
        ({"label_smoothing": 0.5}, r"must be in \[0, 0.5\)"),
        ({"gamma": float("nan")}, r"hparams\['gamma'\] must be finite"),
    ],
)
def test_traced_hyperparameters_are_checked_on_the_host(hparams, message):
    with pytest.raises(ValueError, match=message):
        create_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), 0, hparams=hparams)


def test_stacked_sweep_states_and_valid_hparams_pass():
    with pytest.raises(ValueError, match=r"hparams\['beta'\] must be > 0, got -0.5"):
        check_hparams({"beta": np.array([0.1, -0.5])})  # every member of a stacked sweep
    check_hparams({"beta": jnp.array([0.1, 0.5]), "gamma": -3.0})
    opt = optax.sgd(0.1)
    states = [
        create_train_state({"w": jnp.zeros(2)}, opt, 0, hparams={"beta": b}) for b in (0.1, 2)
    ]
    assert stack_states(states).hparams["beta"].shape == (2,)


@pytest.mark.parametrize(
    "field,value,accepted",
    [
        ("kl_coef", -1.0, ">= 0"),
        ("clip_eps", 0.0, "> 0"),
        ("value_clip_eps", -0.2, "> 0"),
        ("vf_coef", -0.1, ">= 0"),
        ("lam", 1.5, r"in \[0, 1\]"),
        ("gamma", -0.1, r"in \[0, 1\]"),
        ("kl_target", 0.0, "> 0"),
        ("temperature", 0.0, "> 0"),
        ("max_new_tokens", 0, ">= 1"),
        ("top_p", 1.5, r"in \(0, 1\]"),
        ("ppo_epochs", 0, ">= 1"),
    ],
)
def test_ppo_config_checks_every_range(field, value, accepted):
    with pytest.raises(ValueError, match=f"PPO {field} must be {accepted}.*, got"):
        dataclasses.replace(PPOConfig(), **{field: value})


def test_kl_estimator_may_be_a_function():
    logps, ref = (jnp.asarray(np.random.RandomState(i).normal(size=(2, 3))) for i in (1, 2))

    def k3(lp, rl):  # Schulman (2020): (r - 1) - log r, r = pi_ref / pi
        return jnp.exp(rl - lp) - 1.0 - (rl - lp)

    np.testing.assert_allclose(
        losses.kl_estimate(logps, ref, estimator=k3),
        losses.kl_estimate(logps, ref, estimator="k3"),
        rtol=1e-5,
    )
    assert PPOConfig(kl_estimator=k3).kl_estimator is k3
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        PPOConfig(kl_estimator="k4")
