"""experiments/custom_loss.py: DPO-Positive as a user's pairwise loss function, on the bandit
against the closed-form optimum and against a NumPy formula (its driver run: test_drivers.py)."""

import functools
import importlib.util
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "custom_loss.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("custom_loss_example", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_dpop_formula_against_numpy(example):
    rs = np.random.RandomState(0)
    pc, pr, rc, rr = (rs.normal(size=6) for _ in range(4))
    rc[:3] = pc[:3] + 0.5  # the policy lost probability of y_w on half the rows: penalised
    rc[3:] = pc[3:] - 0.5  # and gained it on the others: no penalty
    got = example.dpop(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.3, lam=5.0)
    z = 0.3 * ((pc - rc) - (pr - rr) - 5.0 * np.maximum(0.0, rc - pc))
    np.testing.assert_allclose(got, np.log1p(np.exp(-z)), rtol=1e-5)
    plain = example.dpop(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.3, lam=0.0)
    assert np.all(np.asarray(got)[:3] > np.asarray(plain)[:3])
    np.testing.assert_allclose(np.asarray(got)[3:], np.asarray(plain)[3:], rtol=1e-6)


def test_dpop_at_lambda_zero_reaches_the_optimum_as_dpo_does(example):
    dpo = example.bandit_tv("dpo")
    dpop0 = example.bandit_tv(functools.partial(example.dpop, lam=0.0))
    assert dpo < 0.02 and abs(dpop0 - dpo) < 1e-5, (dpo, dpop0)
    # With the penalty on, DPO-Positive keeps the chosen arms' probabilities up: another policy.
    assert example.bandit_tv(functools.partial(example.dpop, lam=50.0)) > 0.05
