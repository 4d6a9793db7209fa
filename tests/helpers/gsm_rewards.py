"""Two Python rewards with TRL's signature for the GSM8K-style driver test
(tests/test_own_model.py): a format check and an exact match against the dataset's `answer`
column ("... #### 7"); and the DPO loss as a user's `--loss` function."""

import re

NUMBER = re.compile(r"-?\d+")


def format_ok(prompts, completions, **kwargs):
    """1 when the completion starts with a number (after spaces), else 0."""
    return [1.0 if re.match(r"\s*-?\d", c) else 0.0 for c in completions]


def exact_match(prompts, completions, answer, **kwargs):
    """1 when the completion's first number is the answer after "####", 0 when it is another;
    None (not applicable) for a row without an answer."""
    out = []
    for completion, a in zip(completions, answer):
        if not a or "####" not in a:
            out.append(None)
            continue
        found = NUMBER.search(completion)
        out.append(float(found is not None and found.group() == a.split("####")[1].strip()))
    return out


def dpo_sigmoid_plus_one(
    policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta
):
    """The DPO loss written out (Rafailov et al. 2023, Eq. 7), -log sigmoid(beta * margin), plus
    1 (the same gradient; the value shows which loss trained): for `dpo.py --loss`."""
    import jax

    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return 1.0 - jax.nn.log_sigmoid(beta * margin)


def group_median(rewards):
    """A group baseline for `--baseline`: each group's median reward ([P, G] -> [P, G])."""
    import jax.numpy as jnp

    return jnp.broadcast_to(jnp.median(rewards, axis=1, keepdims=True), rewards.shape)


def half_square(logps, ref_logps):
    """A KL estimator for `--kl-estimator`: k2 = (log r)^2 / 2 per token."""
    return 0.5 * (logps - ref_logps) ** 2
