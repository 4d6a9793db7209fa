"""DPO-Positive (Pal et al. 2024) as a pairwise loss function: checked against the closed-form
optimum on the bandit (at λ = 0 it is DPO and reaches π* of Eq. 4), then trained by the DPO driver.

    .venv/bin/python experiments/custom_loss.py --init-from runs/sft_tiny --workdir runs/dpop
"""

import functools
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp

from rlhf_jax import bandit as bd


def dpop(pc, pr, rc, rr, *, beta, lam=50.0):
    """-log σ(β [(pc - rc) - (pr - rr) - λ max(0, rc - pc)]) (Pal et al. 2024, Eq. 3)."""
    return -jax.nn.log_sigmoid(beta * ((pc - rc) - (pr - rr) - lam * jnp.maximum(0.0, rc - pc)))


def bandit_tv(loss, beta=1.0, steps=500):
    """TV to π* (Eq. 4) after training on the expected comparisons of a random bandit."""
    bandit = bd.random_bandit(jax.random.key(0), 4, 5)
    pairs = bd.expected_preference_pairs(bandit.ref_probs, bandit.rewards)
    logits = jax.jit(functools.partial(bd.train_policy, loss, steps=steps))(
        bandit, pairs, beta, jax.random.key(1)
    ).logits
    return float(bd.evaluate_policy(jax.nn.softmax(logits), bandit, beta)["tv"])


def main(argv):
    for name, loss in [("dpo", "dpo"), ("dpop lam=0", functools.partial(dpop, lam=0.0))]:
        print(f"bandit: {name} TV(pi, pi*) = {bandit_tv(loss):.4f}")
    path = pathlib.Path(__file__).with_name("dpo.py")  # the DPO driver, with this loss
    spec = importlib.util.spec_from_file_location("dpo_driver", path)
    dpo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = dpo  # its dataclasses resolve their annotations there
    spec.loader.exec_module(dpo)
    return dpo.main(["--preset", "tiny", *argv], loss_fn=functools.partial(dpop, lam=50.0))


if __name__ == "__main__":
    main(sys.argv[1:])
