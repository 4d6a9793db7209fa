"""rlhf_jax.run.runner.fit on a least-squares toy step on the 8 forced CPU devices (conftest):
logs and checkpoints, resume bit-identical (from a checkpoint, or a plain iterator fast-forwarded),
one trace, periodic evaluation, the stop at a NaN with the last good checkpoint kept."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import data
from rlhf_jax.run import runner
from rlhf_jax.run.metrics_writer import read_metrics

_OPT = optax.adam(0.05)


def _toy_state():
    params = {"w": np.zeros((4,), np.float32), "b": np.zeros((), np.float32)}
    return {"params": params, "opt_state": _OPT.init(params), "step": np.zeros((), np.int32)}


def _toy_step(state, batch):
    def loss_fn(p):
        return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = _OPT.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "w0": params["w"][0]}


def _toy_loader(seed=0):
    rs = np.random.RandomState(0)
    xs = rs.randn(40, 4).astype(np.float32)
    ys = (xs @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.1).astype(np.float32)
    return data.make_loader([{"x": x, "y": y} for x, y in zip(xs, ys)], batch_size=8, seed=seed)


def _fit(workdir, steps, step_fn=_toy_step, **kw):
    kw = {"log_every": 4, "checkpoint_every": 6, "progress": False, **kw}
    return runner.fit(step_fn, _toy_state(), _toy_loader(), workdir=workdir, steps=steps, **kw)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _counting(step_fn):
    count = {"traces": 0}

    def step(state, batch):
        count["traces"] += 1
        return step_fn(state, batch)

    return step, count


def test_fit_logs_checkpoints_and_resumes_bit_identical(tmp_path):
    full_state, full_rows = _fit(tmp_path / "full", 18)
    assert [r["step"] for r in full_rows] == [4, 8, 12, 16, 18]
    assert all(np.isfinite(r["loss"]) for r in full_rows)
    assert full_rows[-1]["loss"] < full_rows[0]["loss"]
    assert list((tmp_path / "full" / "tensorboard").iterdir())

    part = tmp_path / "part"
    _fit(part, 12)
    assert sorted(int(p.name) for p in (part / "checkpoints").iterdir()) == [6, 12]
    # A complete run: nothing compiled or run again, same rows.
    step, count = _counting(_toy_step)
    state, rows = _fit(part, 12, step_fn=step)
    assert count["traces"] == 0 and [r["step"] for r in rows] == [4, 8, 12]
    # More steps continue from 12 and end where the uninterrupted run ends, bit for bit.
    state, rows = _fit(part, 18)
    assert rows == full_rows == read_metrics(part)
    for a, b in zip(jax.tree.leaves(_host(state)), jax.tree.leaves(_host(full_state))):
        np.testing.assert_array_equal(a, b)


def test_fit_resumes_a_plain_iterator_by_fast_forwarding(tmp_path):
    def batches():
        loader = _toy_loader()
        while True:
            yield next(loader)

    def run(wd, steps):
        return runner.fit(
            _toy_step, _toy_state(), batches(), workdir=wd, steps=steps,
            log_every=3, checkpoint_every=3, progress=False,
        )  # fmt: skip

    full_state, full_rows = run(tmp_path / "full", 9)
    run(tmp_path / "part", 6)
    state, rows = run(tmp_path / "part", 9)
    assert rows == full_rows
    np.testing.assert_array_equal(_host(state)["params"]["w"], _host(full_state)["params"]["w"])


def test_fit_traces_the_step_once_and_evaluates(tmp_path):
    step, count = _counting(_toy_step)
    calls = []

    def eval_fn(state, t):
        calls.append(t)
        return {"w0": state["params"]["w"][0]}

    _, rows = _fit(tmp_path, 10, step_fn=step, eval_fn=eval_fn, eval_every=5)
    assert count["traces"] == 1
    assert calls == [5, 10]
    by_step = {r["step"]: r for r in rows}
    assert set(by_step) == {4, 5, 8, 10}  # eval steps are logged too
    assert by_step[10]["eval/w0"] == pytest.approx(by_step[10]["w0"])


@pytest.mark.parametrize(
    "bad_step, log_every, checkpoint_every, kept_rows, kept_ckpts",
    [
        (7, 5, 5, [5], [5]),  # found at the log + checkpoint step 10, after step 5's checkpoint
        (5, 4, 6, [4], []),  # found at checkpoint step 6, not a log step: no checkpoint at 6
    ],
)
def test_fit_stops_at_a_nan_and_keeps_the_last_good_checkpoint(
    tmp_path, bad_step, log_every, checkpoint_every, kept_rows, kept_ckpts
):
    def step(state, batch):
        state, metrics = _toy_step(state, batch)
        loss = jnp.where(state["step"] == bad_step, jnp.nan, metrics["loss"])
        return state, {**metrics, "loss": loss}

    with pytest.raises(FloatingPointError, match=f"non-finite loss .* at step {bad_step}\\b"):
        _fit(tmp_path, 20, step_fn=step, log_every=log_every, checkpoint_every=checkpoint_every)
    ckpts = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == kept_ckpts
    assert [r["step"] for r in read_metrics(tmp_path)] == kept_rows
