"""The PPO update against a hand-written PPO loss and its gradient (Schulman et al. 2017, Eq. 7
and 9; the clipped value loss of OpenAI baselines / TRL).

The rollout is sampled by one policy and the update starts from another, so the ratios
pi_theta / pi_old spread beyond [1 - eps, 1 + eps] and the current values beyond the value clip
range: the clip fractions are then predicted from the numbers. Everything runs at sampling
temperature 0.7 (the loss's log-probs are those of softmax(logits / 0.7)). Reference losses and
log-probs are written out here (tests/helpers/step_reference.py), never `rlhf_jax.losses`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_lm
from helpers.step_reference import assert_sgd_step, entropy, token_logps

from rlhf_jax.models import Transformer, ValueModel, init_value_params
from rlhf_jax.train import PPOConfig, create_ppo_state, make_ppo_rollout, make_ppo_update

CFG = tiny_lm.config(n_layers=2)  # the conftest's tiny(n_layers=2), module-level for helpers
POLICY, VALUE = Transformer(CFG), ValueModel(CFG)
EOS, PAD, N = 3, 0, 6
TEMPERATURE = 0.7
LR_POLICY, LR_VALUE = 0.5, 0.2  # different, so that swapped optimizers show
PPO = PPOConfig(
    kl_coef=0.1,
    lam=0.9,
    clip_eps=0.2,
    value_clip_eps=0.2,
    vf_coef=0.3,
    ppo_epochs=1,
    num_minibatches=1,
    max_new_tokens=N,
    eos_id=EOS,
    pad_id=PAD,
    temperature=TEMPERATURE,
)
PROMPTS = {  # LEFT-padded
    "prompt_tokens": np.array(
        [[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13], [0, 0, 0, 14]] * 4, np.int32
    ),
    "prompt_mask": np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]] * 4, np.int32),
}
P = PROMPTS["prompt_tokens"].shape[1]


def perturbed(tree, seed, scale):
    """Every leaf plus `scale` × its own RMS × N(0, 1) noise (zeros stay small: +scale × 0.02)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for k, x in zip(keys, leaves):
        rms = jnp.sqrt(jnp.mean(jnp.square(x))) + 0.02
        out.append(x + scale * rms * jax.random.normal(k, x.shape, x.dtype))
    return jax.tree.unflatten(treedef, out)


def sequence(ro):
    tokens = jnp.concatenate([ro.query_tokens, ro.response_tokens], axis=1)  # [B, P+N]
    mask = jnp.concatenate([ro.query_mask, ro.response_mask], axis=1)  # [B, P+N]
    return tokens, mask


def response_logits(params, ro, temperature=TEMPERATURE):
    """The logits that predict response token i sit at position P - 1 + i; scaled by 1/T."""
    tokens, mask = sequence(ro)
    logits = POLICY.apply({"params": params}, tokens, attention_mask=mask)
    return logits[:, P - 1 : P - 1 + N] / temperature  # [B, N, V]


def reference_loss(params, ro, cfg):
    """`pg + vf_coef * vf`, both means over the response tokens of the whole batch.

    pg = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = pi_theta / pi_old (the rollout's);
    vf = 1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2).
    """
    policy_params, value_params = params
    m = ro.response_mask.astype(jnp.float32)  # [B, N]
    n = jnp.sum(m)
    logits = response_logits(policy_params, ro, cfg.temperature)
    logps = token_logps(logits, ro.response_tokens)  # [B, N]
    ratio = jnp.exp(jnp.where(m > 0, logps - ro.logps, 0.0))  # [B, N]
    adv = ro.advantages
    clipped = jnp.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
    pg = jnp.sum(jnp.maximum(-adv * ratio, -adv * clipped) * m) / n
    tokens, mask = sequence(ro)
    values = VALUE.apply({"params": value_params}, tokens, mask)[:, P - 1 : P - 1 + N]  # [B, N]
    v_clip = ro.values + jnp.clip(values - ro.values, -cfg.value_clip_eps, cfg.value_clip_eps)
    err = jnp.maximum((values - ro.returns) ** 2, (v_clip - ro.returns) ** 2)
    vf = 0.5 * jnp.sum(err * m) / n
    aux = {"pg": pg, "vf": vf, "logps": logps, "values": values, "logits": logits}
    return pg + cfg.vf_coef * vf, aux


@pytest.fixture(scope="module")
def setup(tiny):
    """A scored rollout at temperature 0.7 from policy P0 / critic V0, plus the state that
    sampled it."""
    p0 = tiny(n_layers=2).params
    ref = perturbed(p0, 1, 0.5)
    v0 = init_value_params(CFG, jax.random.PRNGKey(2), p0)
    v0["head"]["kernel"] = 0.5 * jax.random.normal(jax.random.PRNGKey(3), (CFG.d_model, 1))
    opt_p, opt_v = optax.sgd(LR_POLICY), optax.sgd(LR_VALUE)
    state = create_ppo_state(
        PPO,
        policy_params=p0,
        value_params=v0,
        ref_params=ref,
        policy_optimizer=opt_p,
        value_optimizer=opt_v,
        rng=7,
    )
    _, ro = jax.jit(make_ppo_rollout(POLICY, VALUE, PPO))(state, PROMPTS)
    # Scores and GAE are not under test here: random advantages and returns of both signs.
    rs = np.random.RandomState(4)
    mask = np.asarray(ro.response_mask)
    ro = ro.replace(
        advantages=jnp.asarray(rs.normal(size=mask.shape) * mask, jnp.float32),
        returns=jnp.asarray((np.asarray(ro.values) + rs.normal(size=mask.shape)) * mask),
    )
    return state, ro, opt_p, opt_v


def update_with(cfg, state, ro, opt_p, opt_v, policy_params=None, value_params=None):
    state = state.replace(
        policy_params=jax.tree.map(jnp.copy, policy_params or state.policy_params),
        value_params=jax.tree.map(jnp.copy, value_params or state.value_params),
    )
    return jax.jit(make_ppo_update(POLICY, VALUE, opt_p, opt_v, cfg))(state, ro)


def test_rollout_log_probs_are_those_at_the_sampling_temperature(setup):
    state, ro, *_ = setup
    mask = np.asarray(ro.response_mask)
    assert 0 < mask.sum() < mask.size  # some completions end with EOS before N tokens
    logits = response_logits(state.policy_params, ro)
    ref_logits = response_logits(state.ref_params, ro)
    want = np.asarray(token_logps(logits, ro.response_tokens)) * mask
    np.testing.assert_allclose(ro.logps, want, atol=2e-5)
    np.testing.assert_allclose(ro.sample_logps * mask, want, atol=2e-5)  # the sampler's own
    want_ref = np.asarray(token_logps(ref_logits, ro.response_tokens)) * mask
    np.testing.assert_allclose(ro.ref_logps, want_ref, atol=2e-5)
    # Exact per-token KL(pi(.|s_t) || pi_ref(.|s_t)) of the tempered distributions, in NumPy.
    lp, lq = (np.asarray(x, np.float64) for x in (logits, ref_logits))
    lp, lq = (x - x.max(-1, keepdims=True) for x in (lp, lq))
    lp, lq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (lp, lq))
    kl = (np.exp(lp) * (lp - lq)).sum(-1) * mask
    assert kl.sum() > 1e-2
    np.testing.assert_allclose(ro.kl_exact, kl, rtol=1e-4, atol=1e-6)


def test_chunked_rollout_equals_the_full_logits_rollout(setup):
    """With `logits_chunk` the rollout's log-probs, reference log-probs and exact KL come from
    `chunked_logps_and_exact_kl` (no [B, N, V] logits held): the same numbers."""
    state, ro, *_ = setup
    chunked = Transformer(dataclasses.replace(CFG, logits_chunk=4))  # 4 does not divide N + P - 1
    _, got = jax.jit(make_ppo_rollout(chunked, VALUE, PPO))(state, PROMPTS)
    np.testing.assert_array_equal(got.response_tokens, ro.response_tokens)
    for name in ("logps", "ref_logps", "kl_exact", "values"):
        np.testing.assert_allclose(getattr(got, name), getattr(ro, name), rtol=1e-5, atol=2e-6)


def test_update_gradient_and_clip_fractions(setup):
    state, ro, opt_p, opt_v = setup
    p1 = perturbed(state.policy_params, 5, 0.5)  # pi_theta != pi_old
    v1 = perturbed(state.value_params, 6, 0.3)  # V != V_old
    (want, aux), (g_p, g_v) = jax.value_and_grad(reference_loss, has_aux=True)((p1, v1), ro, PPO)
    new_state, m = update_with(PPO, state, ro, opt_p, opt_v, p1, v1)

    np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["policy_loss"], aux["pg"], rtol=1e-5)
    np.testing.assert_allclose(m["value_loss"], aux["vf"], rtol=1e-5)
    assert_sgd_step(p1, new_state.policy_params, g_p, LR_POLICY)
    assert_sgd_step(v1, new_state.value_params, g_v, LR_VALUE)

    # Clip fractions predicted from the numbers: the clipped term is active where rho left
    # [1 - eps, 1 + eps] on the side the advantage pushes it.
    mask = np.asarray(ro.response_mask) > 0
    log_ratio = np.asarray(aux["logps"], np.float64) - np.asarray(ro.logps, np.float64)
    ratio, adv = np.exp(log_ratio)[mask], np.asarray(ro.advantages, np.float64)[mask]
    active = ((adv > 0) & (ratio > 1.2)) | ((adv < 0) & (ratio < 0.8))
    assert 0.05 < active.mean() < 0.95 and ((ratio > 1.2) | (ratio < 0.8)).mean() > 0.2
    np.testing.assert_allclose(m["clipfrac"], active.mean(), atol=1e-6)
    np.testing.assert_allclose(m["approx_kl"], np.mean(0.5 * log_ratio[mask] ** 2), rtol=1e-4)
    v, v_old = np.asarray(aux["values"], np.float64)[mask], np.asarray(ro.values)[mask]
    ret = np.asarray(ro.returns, np.float64)[mask]
    v_clip = v_old + np.clip(v - v_old, -0.2, 0.2)
    v_active = (v_clip - ret) ** 2 > (v - ret) ** 2
    assert 0.1 < v_active.mean() < 0.9
    np.testing.assert_allclose(m["value_clipfrac"], v_active.mean(), atol=1e-6)
    np.testing.assert_allclose(m["entropy"], entropy(aux["logits"])[mask].mean(), rtol=1e-5)
    # value_error: the current values' squared error over the response tokens (not clipped, not
    # halved); each tree's gradient and update norms from the hand gradients (SGD: lr x |g|).
    np.testing.assert_allclose(m["value_error"], np.mean((v - ret) ** 2), rtol=1e-5)
    norms = {
        name: np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(g)))
        for name, g in (("policy", g_p), ("value", g_v))
    }
    lrs = {"policy": LR_POLICY, "value": LR_VALUE}
    for name in ("policy", "value"):
        np.testing.assert_allclose(m[f"{name}_grad_norm"], norms[name], rtol=1e-4)
        np.testing.assert_allclose(m[f"{name}_update_norm"], lrs[name] * norms[name], rtol=1e-4)
    np.testing.assert_allclose(m["grad_norm"], np.hypot(norms["policy"], norms["value"]), 1e-4)
    steps = (LR_POLICY * norms["policy"], LR_VALUE * norms["value"])
    np.testing.assert_allclose(m["update_norm"], np.hypot(*steps), rtol=1e-4)
    assert abs(norms["policy"] - norms["value"]) > 1e-2 * norms["value"]  # swapped groups show


def test_later_epoch_ratio_is_against_the_rollout_policy(setup):
    """Two epochs from the rollout's own policy: the first sees rho = 1 (no clipping, approx
    KL 0), the second rho = pi_theta' / pi_old with the rollout's log-probs (approx KL > 0).
    The metrics are the means of the two; the params are two hand-computed SGD steps away."""
    state, ro, opt_p, opt_v = setup
    cfg = dataclasses.replace(PPO, ppo_epochs=2)
    p0, v0 = state.policy_params, state.value_params
    grad = jax.jit(jax.value_and_grad(reference_loss, has_aux=True), static_argnums=2)
    (_, aux0), (g0p, g0v) = grad((p0, v0), ro, cfg)
    p1 = jax.tree.map(lambda x, g: x - LR_POLICY * g, p0, g0p)
    v1 = jax.tree.map(lambda x, g: x - LR_VALUE * g, v0, g0v)
    (_, aux1), (g1p, g1v) = grad((p1, v1), ro, cfg)
    mask = np.asarray(ro.response_mask) > 0
    np.testing.assert_allclose(
        np.asarray(aux0["logps"])[mask], np.asarray(ro.logps)[mask], atol=2e-5
    )
    kl1 = np.mean(0.5 * (np.asarray(aux1["logps"]) - np.asarray(ro.logps))[mask] ** 2)
    assert kl1 > 1e-3

    new_state, m = update_with(cfg, state, ro, opt_p, opt_v)
    np.testing.assert_allclose(m["policy_loss"], (aux0["pg"] + aux1["pg"]) / 2, rtol=1e-4)
    np.testing.assert_allclose(m["value_loss"], (aux0["vf"] + aux1["vf"]) / 2, rtol=1e-4)
    np.testing.assert_allclose(m["approx_kl"], kl1 / 2, rtol=1e-3)
    g_p = jax.tree.map(jnp.add, g0p, g1p)
    g_v = jax.tree.map(jnp.add, g0v, g1v)
    assert_sgd_step(p0, new_state.policy_params, g_p, LR_POLICY, rtol=1e-4)
    assert_sgd_step(v0, new_state.value_params, g_v, LR_VALUE, rtol=1e-4)


def test_first_epoch_at_temperature_has_unit_ratio(setup):
    """Rollout and update agree on the temperature: from the sampling policy, rho = 1 exactly
    where it matters (no clipping, approx KL ~ 0)."""
    state, ro, opt_p, opt_v = setup
    _, m = update_with(PPO, state, ro, opt_p, opt_v)
    assert float(m["approx_kl"]) < 1e-9
    assert float(m["clipfrac"]) == 0.0


def test_vf_coef_scales_only_the_value_gradient(setup):
    state, ro, opt_p, opt_v = setup
    p1 = perturbed(state.policy_params, 5, 0.5)
    v1 = perturbed(state.value_params, 6, 0.3)
    runs = []
    for coef in (0.3, 0.6):
        cfg = dataclasses.replace(PPO, vf_coef=coef)
        new_state, m = update_with(cfg, state, ro, opt_p, opt_v, p1, v1)
        runs.append((new_state, m))
    (s1, m1), (s2, m2) = runs

    def delta(new, old):
        return np.concatenate(
            [
                np.ravel(np.asarray(a, np.float64) - np.asarray(b))
                for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old))
            ]
        )

    dv1, dv2 = delta(s1.value_params, v1), delta(s2.value_params, v1)
    size = np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(v1)]))
    assert np.linalg.norm(dv1) > 1e-3 * size
    # Up to 1e-5 relative, plus the rounding of the three float32 params (half an ulp each).
    assert np.linalg.norm(dv2 - 2 * dv1) <= 1e-5 * np.linalg.norm(dv2) + 3 * 2.0**-24 * size
    np.testing.assert_allclose(
        delta(s2.policy_params, p1), delta(s1.policy_params, p1), rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(m2["loss"] - m1["loss"], 0.3 * m1["value_loss"], rtol=1e-4)
