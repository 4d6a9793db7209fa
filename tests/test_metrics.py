"""Logged metrics pinned to their definitions (issue 26, "logged metrics").

Researchers read `metrics.jsonl` and some stop runs on it, so each key no other test pins is
recomputed here from the step's inputs and outputs: plain NumPy loops over the masked
positions, each estimator's formula written out, the raw score kept apart from the shaped or
KL-penalised reward. Wherever the contract lets padding hold anything, it holds large garbage,
so a metric averaged over padded positions shows. Pure-array tests first (no model), then the
steps on the conftest's tiny decoder (forwards only: the updates' own metrics are pinned in
test_train_ppo*.py and test_train_*.py).
"""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import drivers
from helpers.batches import preference_batch

from rlhf_jax import losses, sweeps, train
from rlhf_jax.data import arithmetic as ar
from rlhf_jax.frontier import context as frontier_context
from rlhf_jax.train.critic_free import CriticFreeRollout, make_critic_free_score
from rlhf_jax.train.ppo import Rollout, rollout_metrics

# ---------------------------------------------------------------------------------------------
# make_step: metrics of a step with microbatches (the microbatches' means, consecutive rows).


def _regression_loss(params, batch, *, frozen, hparams):
    err = batch["x"] @ params["w"] - batch["y"]  # [B]
    metrics = {
        "abs_err": jnp.mean(jnp.abs(err)),  # a mean over rows
        "weighted_err": jnp.sum(batch["weight"] * err) / jnp.sum(batch["weight"]),  # a ratio
    }
    return jnp.mean(jnp.square(err)), metrics


@pytest.mark.parametrize("k", [1, 3])
def test_step_metrics_are_the_means_of_consecutive_microbatches(k):
    """A row mean (loss, abs_err) is the full batch's whatever k; a ratio of sums is the mean of
    the k consecutive microbatches' ratios (make_step's doc); grad_norm is the norm of the whole
    batch's gradient, update_norm that of the update applied."""
    rs = np.random.RandomState(0)
    x = rs.randn(6, 3).astype(np.float32)
    y = rs.randn(6).astype(np.float32)
    weight = np.array([1.0, 5.0, 0.5, 2.0, 3.0, 0.25], np.float32)
    w0 = np.array([0.5, -1.0, 2.0], np.float32)
    opt = optax.sgd(0.1)
    state = train.create_train_state({"w": jnp.asarray(w0)}, opt, 0)
    batch = {"x": x, "y": y, "weight": weight}
    new, m = jax.jit(train.make_step(_regression_loss, opt, microbatches=k))(state, batch)

    x64, y64, w64 = (a.astype(np.float64) for a in (x, y, weight))
    err = x64 @ w0 - y64
    grad = 2.0 * x64.T @ err / len(y)  # d/dw mean(err^2) over the whole batch
    chunks = np.split(np.arange(6), k)  # consecutive rows
    weighted = np.mean([np.sum(w64[c] * err[c]) / np.sum(w64[c]) for c in chunks])
    if k > 1:  # the case tells a mean of ratios from the full batch's ratio
        assert abs(weighted - np.sum(w64 * err) / np.sum(w64)) > 1e-2
    np.testing.assert_allclose(m["loss"], np.mean(err**2), rtol=1e-5)
    np.testing.assert_allclose(m["abs_err"], np.mean(np.abs(err)), rtol=1e-5)
    np.testing.assert_allclose(m["weighted_err"], weighted, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], np.linalg.norm(grad), rtol=1e-5)
    np.testing.assert_allclose(m["update_norm"], 0.1 * np.linalg.norm(grad), rtol=1e-5)
    np.testing.assert_allclose(new.params["w"], w0 - 0.1 * grad, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# losses.policy_gradient_loss: the critic-free update's metrics.

PG_MASK = np.array(
    [
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],  # a row dropped by dynamic sampling
        [1, 1, 1, 1, 1, 0, 0],
    ],
    np.int32,
)


def _pg_inputs(seed):
    """Log-probs with ratios on both sides of the clip; garbage wherever the mask is 0."""
    rs = np.random.RandomState(seed)
    pad = PG_MASK == 0
    old = (rs.randn(5, 7) - 2).astype(np.float32)
    logps = (old + 0.4 * rs.randn(5, 7)).astype(np.float32)
    logps[pad] = old[pad] + 3.0  # ratio e^3 there, if it were read
    ref = (old + 0.5 * rs.randn(5, 7)).astype(np.float32)
    ref[pad] = -9.0
    entropy = rs.uniform(0.5, 2.0, (5, 7)).astype(np.float32)
    entropy[pad] = 50.0
    adv = rs.randn(5).astype(np.float32)
    return logps, old, adv, ref, entropy


def _pg_metrics_by_loops(logps, old, adv, ref, entropy, *, low, high, ratio, aggregation,
                         max_tokens, estimator):  # fmt: skip
    """The metrics of the clipped policy-gradient loss by their definitions, in float64."""
    b_, t_ = PG_MASK.shape
    toks = [(b, t) for b in range(b_) for t in range(t_) if PG_MASK[b, t]]
    rows = sorted({b for b, _ in toks})
    log_ratio = {(b, t): float(logps[b, t]) - float(old[b, t]) for b, t in toks}
    seq = {b: math.exp(np.mean([log_ratio[(c, t)] for c, t in toks if c == b])) for b in rows}
    rho = {bt: seq[bt[0]] if ratio == "sequence" else math.exp(log_ratio[bt]) for bt in toks}
    term, low_hit, high_hit = {}, 0, 0
    for b, t in toks:
        a, r = float(adv[b]), rho[(b, t)]
        term[(b, t)] = max(-a * r, -a * min(max(r, 1 - low), 1 + high))
        low_hit += a < 0 and r < 1 - low
        high_hit += a > 0 and r > 1 + high
    if aggregation == "token_mean":
        pg = sum(term.values()) / len(toks)
    elif aggregation == "sequence_mean":
        pg = np.mean([np.mean([term[(c, t)] for c, t in toks if c == b]) for b in rows])
    else:  # sequence_sum_norm
        pg = sum(term.values()) / (len(rows) * max_tokens)
    kl = []
    for b, t in toks:
        log_r = float(ref[b, t]) - float(logps[b, t])  # log pi_ref / pi
        kl.append(-log_r if estimator == "k1" else math.exp(log_r) - 1 - log_r)
    n = len(toks)
    return {
        "pg_loss": pg,
        "ratio_mean": sum(rho.values()) / n,
        "approx_kl": sum(0.5 * v**2 for v in log_ratio.values()) / n,  # (log r)^2 / 2
        "kl": sum(kl) / n,
        "clipfrac_low": low_hit / n,
        "clipfrac_high": high_hit / n,
        "clipfrac": (low_hit + high_hit) / n,
        "entropy": sum(float(entropy[b, t]) for b, t in toks) / n,
    }


PG_CASES = [  # ratio, aggregation, clip low, clip high, max_tokens, KL estimator
    ("token", "sequence_mean", 0.2, 0.2, None, "k3"),  # GRPO
    ("token", "sequence_sum_norm", 0.2, 0.2, 10, "k1"),  # Dr. GRPO
    ("token", "token_mean", 0.2, 0.28, None, "k3"),  # DAPO
    ("sequence", "sequence_mean", 0.05, 0.08, None, "k3"),  # GSPO
]


@pytest.mark.parametrize("case", PG_CASES, ids=[f"{c[0]}-{c[1]}" for c in PG_CASES])
def test_policy_gradient_metrics_over_masked_tokens(case):
    """ratio_mean: the mean of the ratio each masked token is trained with (the row's sequence
    ratio under GSPO); approx_kl: TRL's (log r)^2 / 2 of the token log-ratio, not k3; kl: the
    estimator's masked token mean; pg_loss: the clipped term alone (no KL), aggregated as the
    loss; clipfrac = clipfrac_low + clipfrac_high; entropy: the masked token mean."""
    ratio, aggregation, low, high, max_tokens, estimator = case
    logps, old, adv, ref, entropy = _pg_inputs(3)
    loss, m = losses.policy_gradient_loss(
        logps, old, adv, PG_MASK, clip_eps_low=low, clip_eps_high=high, ratio=ratio,
        aggregation=aggregation, max_tokens=max_tokens, ref_logps=ref, kl_coef=0.3,
        kl_estimator=estimator, entropy=entropy,
    )  # fmt: skip
    want = _pg_metrics_by_loops(
        logps, old, adv, ref, entropy, low=low, high=high, ratio=ratio, aggregation=aggregation,
        max_tokens=max_tokens, estimator=estimator,
    )  # fmt: skip
    assert set(want) <= set(m)
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    # The case tells the estimators and the means apart: k3 != (log r)^2 / 2, the ratio's
    # masked mean != 1, the loss (with its KL term) != pg_loss, both clips active.
    k3 = np.mean([np.expm1(v) - v for v in np.asarray(logps - old)[PG_MASK > 0]])
    assert abs(want["approx_kl"] - k3) > 1e-3 * want["approx_kl"]
    assert abs(want["ratio_mean"] - 1.0) > 1e-3 and abs(float(loss) - want["pg_loss"]) > 1e-3
    assert want["clipfrac_high"] > 0 and (ratio == "sequence" or want["clipfrac_low"] > 0)


# ---------------------------------------------------------------------------------------------
# PPO: the rollout's statistics (train.ppo.rollout_metrics).

RO_MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], np.int32)


def _scored_rollout():
    """A hand-made scored Rollout: rows 0 and 2 end with EOS, rows 1 and 3 are truncated;
    every per-token field but `rewards` (0 off the mask by contract) holds garbage there."""
    rs = np.random.RandomState(1)
    pad = RO_MASK == 0
    logps = (-1.0 - rs.rand(4, 5)).astype(np.float32)
    ref_logps = (logps + 0.6 * rs.randn(4, 5)).astype(np.float32)
    logps[pad], ref_logps[pad] = -0.1, -6.0
    kl_exact = rs.uniform(0.0, 0.5, (4, 5)).astype(np.float32)
    rewards = np.where(pad, 0.0, rs.randn(4, 5)).astype(np.float32)
    adv, ret, values = (rs.randn(4, 5).astype(np.float32) for _ in range(3))
    for x, junk in ((kl_exact, 7.0), (adv, 5.0), (ret, -4.0), (values, 9.0)):
        x[pad] = junk
    return Rollout(
        query_tokens=np.ones((4, 2), np.int32), query_mask=np.ones((4, 2), np.int32),
        response_tokens=np.where(pad, 0, 5).astype(np.int32), response_mask=RO_MASK,
        sample_logps=logps, logps=logps, ref_logps=ref_logps, values=values, kl_exact=kl_exact,
        has_eos=np.array([1, 0, 1, 0], np.int32),
        scores=np.array([0.5, 2.0, -1.0, 1.5], np.float32),
        rewards=rewards, advantages=adv, returns=ret,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["subtract", "replace"])
def test_ppo_rollout_metrics_are_their_definitions(mode):
    """score: the raw reward; score_penalized: after the missing-EOS penalty; rlhf_reward: the
    per-sequence sum of the shaped per-token rewards; kl_k1 / kl_k3 / kl_exact: per-sequence
    sums over the response of log(pi/pi_ref), r - 1 - log r (r = pi_ref/pi), the exact KL;
    advantage_mean / return_mean: means over response tokens; kl_coef: the one passed."""
    cfg = train.PPOConfig(missing_eos_penalty=-2.5 if mode == "replace" else 1.5,
                          missing_eos_mode=mode, eos_id=3, max_new_tokens=5)  # fmt: skip
    ro = _scored_rollout()
    m = rollout_metrics(ro, cfg, jnp.float32(0.07))
    live = RO_MASK > 0
    scores = ro.scores.astype(np.float64)
    missing = ro.has_eos == 0
    penalized = np.where(missing, -2.5, scores) if mode == "replace" else scores - 1.5 * missing
    log_r = np.asarray(ro.ref_logps, np.float64) - ro.logps
    want = {
        "score": scores.mean(),
        "score_penalized": penalized.mean(),
        "rlhf_reward": np.mean([ro.rewards[b][live[b]].sum() for b in range(4)]),
        "kl_k1": np.mean([(-log_r[b])[live[b]].sum() for b in range(4)]),
        "kl_k3": np.mean([(np.exp(log_r[b]) - 1 - log_r[b])[live[b]].sum() for b in range(4)]),
        "kl_exact": np.mean([ro.kl_exact[b][live[b]].sum() for b in range(4)]),
        "kl_coef": 0.07,
        "response_length": RO_MASK.sum(1).mean(),
        "eos_rate": 0.5,
        "advantage_mean": ro.advantages[live].mean(),
        "return_mean": ro.returns[live].mean(),
    }
    assert set(m) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert abs(want["score"] - want["score_penalized"]) > 0.1  # the case tells them apart


# ---------------------------------------------------------------------------------------------
# Critic-free: the sampled batch's statistics (make_critic_free_score's `stats`).


def test_critic_free_stats_keep_raw_and_shaped_reward_apart():
    """4 prompts x 4 completions, N = 6, overlong penalty over the last 3 tokens, dynamic sampling
    of 3 groups. Group 0 differs in its raw reward, group 1 only after the length penalty, groups
    2 and 3 not at all. reward / reward_std_in_group (the groups' mean population std) read the
    raw task reward; reward_shaped the reward with the penalty; groups_informative (of the 4
    sampled) and groups_kept (informative share of the 3 kept) the rewards the advantages use;
    response_length every sampled completion."""
    lengths = np.array([2, 3, 3, 2, 2, 3, 5, 6, 2, 2, 2, 2, 4, 4, 4, 4])
    raw = np.array([1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], np.float32)
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int32)
    rs = np.random.RandomState(0)
    logps = np.where(mask > 0, -rs.rand(16, 6), 0.0).astype(np.float32)
    ro = CriticFreeRollout(
        query_tokens=np.ones((16, 3), np.int32), query_mask=np.ones((16, 3), np.int32),
        response_tokens=np.where(mask > 0, 4, 0).astype(np.int32), response_mask=mask,
        logps=logps, ref_logps=logps, scores=raw, advantages=np.zeros((16, 6), np.float32),
    )  # fmt: skip
    cfg = train.CriticFreeConfig(
        algo="grpo", group_size=4, max_new_tokens=6, overlong_cache=3, dynamic_sampling=True,
        num_groups=3,
    )  # fmt: skip
    _, scored = make_critic_free_score(cfg)(types.SimpleNamespace(hparams={}), ro)
    penalty = np.clip(np.minimum((6 - 3 - lengths) / 3, 0.0), -1.0, 0.0)  # DAPO Eq. 13
    shaped = raw + penalty
    want = {
        "reward": raw.mean(),
        "reward_shaped": shaped.mean(),
        "reward_std_in_group": np.mean([raw[g * 4 : g * 4 + 4].std() for g in range(4)]),
        "response_length": lengths.mean(),
        "groups_informative": 2 / 4,  # groups 0 and 1
        "groups_kept": 2 / 3,  # groups 0, 1 and (no signal, weight 0) 2
    }
    assert set(scored.stats) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(scored.stats[k], v, rtol=1e-6, err_msg=k)
    assert abs(raw.mean() - shaped.mean()) > 0.1


# ---------------------------------------------------------------------------------------------
# Sweeps and the frontier's points.


def test_sweep_metrics_name_each_member_and_keep_the_worst_health():
    """`name/i` is member i's value; loss is the members' mean (a NaN anywhere shows);
    grad_norm / update_norm are the largest member's (what the NaN check and a reader of the
    health metrics need)."""
    metrics = {
        "loss": jnp.array([1.0, 3.0, 2.0]),
        "grad_norm": jnp.array([0.5, 4.0, 1.0]),
        "update_norm": jnp.array([0.2, 0.1, 0.3]),
        "rewards/margin": jnp.array([-1.0, 0.0, 1.0]),
    }
    out = sweeps.flatten_sweep_metrics(metrics)
    want = {f"{k}/{i}": float(v[i]) for k, v in metrics.items() for i in range(3)}
    want.update({"loss": 2.0, "grad_norm": 4.0, "update_norm": 0.3})
    assert set(out) == set(want)
    for k, v in want.items():
        assert float(out[k]) == pytest.approx(v), k


def test_frontier_points_are_each_members_evaluation():
    """`Context.sweep_eval` evaluates member i's own policy into kl/i, reward/i, stderr/i, and
    `rows_from_metrics` makes member i's point from its eval/ columns at each evaluated step."""
    opt = optax.sgd(0.1)
    states = [train.create_train_state({"w": jnp.float32(w)}, opt, 0) for w in (1.0, 2.0, 3.0)]
    sweep = sweeps.stack_sweep(states)

    def evaluate(params):  # (kl, reward, stderr, texts) of a policy, told apart by its weight
        w = float(params["w"])
        return w, 10.0 * w, 0.01 * w, []

    ctx = types.SimpleNamespace(evaluate=evaluate)
    evals = frontier_context.Context.sweep_eval(ctx, 3, lambda s: s.params)(sweep, 5)
    want = {}
    for i, w in enumerate((1.0, 2.0, 3.0)):
        want.update({f"kl/{i}": w, f"reward/{i}": 10.0 * w, f"stderr/{i}": 0.01 * w})
    assert evals == pytest.approx(want)

    rows = [{"step": 4, "loss": 0.3}, {"step": 5, **{f"eval/{k}": v for k, v in evals.items()}}]
    members = [("dpo", "beta=0.1"), ("dpo", "beta=0.5"), ("dpo", "beta=1")]
    points = frontier_context.rows_from_metrics(rows, members, seed=7)
    assert points == [
        {"method": "dpo", "hyperparameter": h, "seed": 7, "step": 5, "kl": w, "reward": 10 * w,
         "stderr": pytest.approx(0.01 * w)}
        for (_, h), w in zip(members, (1.0, 2.0, 3.0))
    ]  # fmt: skip


def test_frontier_evaluate_is_kl_reward_stderr_vs_the_sft_model(monkeypatch):
    """`Context.evaluate(params)`: `evaluate_reward_kl` of `params` against the SFT model on the
    fixed evaluation prompts and key (common random numbers for every policy), returned as
    (kl_mean, reward_mean, reward_stderr, texts): the order every frontier point reads."""
    seen = {}

    def fake_evaluate(model, params, ref_params, batch, rng, **kwargs):
        seen.update(model=model, params=params, ref=ref_params, batch=batch, rng=rng)
        return types.SimpleNamespace(kl_mean=0.5, reward_mean=0.25, reward_stderr=0.125,
                                     texts=["a", "b"])  # fmt: skip

    monkeypatch.setattr(frontier_context.ev, "evaluate_reward_kl", fake_evaluate)
    ctx = types.SimpleNamespace(
        model="model", sft_params="sft", eval_batch="prompts", eval_rng="key", sampling=None,
        tok=types.SimpleNamespace(eos_id=1, pad_id=0),
        config=types.SimpleNamespace(eval_prompts=8),
    )  # fmt: skip
    out = frontier_context.Context.evaluate(ctx, "policy", texts=True)
    assert out == (0.5, 0.25, 0.125, ["a", "b"])
    assert seen == dict(model="model", params="policy", ref="sft", batch="prompts", rng="key")


# ---------------------------------------------------------------------------------------------
# The GRPO driver's eval/pass_at_1: greedy exact-match rate on held-out problems.


def test_grpo_pass_at_1_is_greedy_exact_match_on_held_out_problems(monkeypatch):
    """`pass_at_1_fn` with the sampler replaced by one that answers row i right unless i % 3 == 0
    (the sums computed here from the decoded prompts): the rate is the share of right rows,
    the decoding greedy, the problems not the training stream's."""
    grpo = drivers.load("grpo")
    Generated = collections.namedtuple("Generated", "tokens mask")  # a pytree, as the sampler's
    task = ar.ArithmeticTask(digits=2)
    tok = ar.CharTokenizer()
    seen = {}

    def answers(prompts, mask):
        rows = []
        for i, (p, m) in enumerate(zip(np.asarray(prompts), np.asarray(mask))):
            a, b = tok.decode(p[m > 0]).rstrip("=").split("+")
            total = int(a) + int(b) + (1 if i % 3 == 0 else 0)  # every third answer wrong
            ids = tok.encode(str(total)) + [ar.EOS]
            rows.append(ids + [ar.PAD] * (task.answer_length - len(ids)))
        seen["prompts"] = np.asarray(prompts)
        return np.asarray(rows, np.int32)

    def fake_generate(model, params, prompts, mask, rng, *, max_new_tokens, temperature, **kw):
        seen["temperature"] = temperature
        shape = jax.ShapeDtypeStruct((prompts.shape[0], max_new_tokens), jnp.int32)
        tokens = jax.pure_callback(answers, shape, prompts, mask)
        out_mask = (jnp.cumsum(tokens == ar.EOS, axis=1) - (tokens == ar.EOS)) == 0
        return Generated(tokens, out_mask.astype(jnp.int32))

    monkeypatch.setattr(grpo, "generate", fake_generate)
    n = 30
    rate = grpo.pass_at_1_fn(None, task, n, seed=4)({"w": jnp.zeros(())})
    assert seen["temperature"] == 0.0  # greedy
    assert seen["prompts"].shape[0] == n
    for stream in (4, 4 + 2):  # the SFT and the RL prompt streams of seed 4
        train_prompts, _ = task.prompts(task.problems(n, stream))
        assert not np.array_equal(seen["prompts"], train_prompts)  # held out
    assert rate == pytest.approx(1.0 - 10 / 30)


# ---------------------------------------------------------------------------------------------
# The steps on the tiny decoder (forwards only).


def _log_softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _sft_batch(model, params, vocab):
    """Right-padded demonstrations whose every other response target is the model's argmax
    (so token accuracy is neither 0 nor 1); prompts of 2-4 tokens."""
    rs = np.random.RandomState(5)
    b, t = 4, 12
    tokens, attn, loss = (np.zeros((b, t), np.int32) for _ in range(3))
    for i, (n_prompt, length) in enumerate([(2, 12), (3, 9), (2, 7), (4, 11)]):
        tokens[i, :length] = rs.randint(1, vocab, size=length)
        attn[i, :length] = 1
        loss[i, n_prompt:length] = 1
    fwd = jax.jit(lambda tok, m: model.apply({"params": params}, tok, attention_mask=m))
    for pos in range(1, t, 2):  # a target depends only on the tokens before it
        logits = np.asarray(fwd(tokens, attn))
        hit = (loss[:, pos] > 0) & (rs.rand(b) < 0.8)
        tokens[hit, pos] = logits[hit, pos - 1].argmax(-1)
    return {"tokens": tokens, "attention_mask": attn, "loss_mask": loss}, fwd


@pytest.mark.parametrize("reduction", ["token", "example"])
def test_sft_metrics_are_token_weighted_over_response_tokens(tiny_model, tiny_params, reduction):
    """nll_token: the token-weighted NLL whatever the reduction (the loss is the mean of the
    rows' means with "example"); accuracy: argmax == target over the loss-masked targets only;
    num_tokens: their count."""
    batch, fwd = _sft_batch(tiny_model, tiny_params, tiny_model.config.vocab_size)
    m = jax.jit(train.make_sft_eval(tiny_model, reduction=reduction))(tiny_params, batch)
    logp = _log_softmax(fwd(batch["tokens"], batch["attention_mask"]))[:, :-1]  # [B, T-1, V]
    targets = batch["tokens"][:, 1:]
    live = batch["loss_mask"][:, 1:] > 0
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]  # [B, T-1]
    hit = logp.argmax(-1) == targets
    per_row = [nll[b][live[b]].mean() for b in range(len(live))]
    loss = nll[live].mean() if reduction == "token" else np.mean(per_row)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(m["nll_token"], nll[live].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], hit[live].mean(), rtol=1e-6)
    assert int(m["num_tokens"]) == live.sum()
    assert 0.2 < hit[live].mean() < 0.9 and abs(hit[live].mean() - hit.mean()) > 1e-3
    if reduction == "example":
        assert abs(np.mean(per_row) - nll[live].mean()) > 1e-3


def _side_logps(fwd, batch, side):
    """Per-row (sum, mean) of the response tokens' log-probs of one side, by a plain loop."""
    tokens, attn = batch[f"{side}_tokens"], batch[f"{side}_attention_mask"]
    logp = _log_softmax(fwd(tokens, attn))
    sums, means = [], []
    for b in range(tokens.shape[0]):
        picked = [logp[b, t, tokens[b, t + 1]] for t in range(tokens.shape[1] - 1)
                  if batch[f"{side}_loss_mask"][b, t + 1]]  # fmt: skip
        sums.append(sum(picked))
        means.append(sum(picked) / len(picked))
    return np.array(sums), np.array(means), logp


@pytest.fixture(scope="module")
def pairs(tiny_model, tiny_params):
    batch = preference_batch(4, 6, 10, tiny_model.config.vocab_size)
    fwd = jax.jit(lambda tok, m: tiny_model.apply({"params": tiny_params}, tok, attention_mask=m))
    return batch, {s: _side_logps(fwd, batch, s) for s in ("chosen", "rejected")}


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_dpo_metrics_keep_each_side(tiny_model, tiny_params, pairs, loss_type):
    """SimPO and ORPO (length-averaged log-probs c, r): rewards/chosen = beta mean(c),
    rewards/rejected = beta mean(r), rewards/accuracy = share with c > r, rewards/margin =
    beta mean(c - r), logps/* the means of c and r; ORPO's nll (the token-weighted NLL of the
    chosen responses) and odds_ratio_loss (mean -log sigmoid(log odds c - log odds r))."""
    batch, logps = pairs
    beta = 2.0 if loss_type == "simpo" else 0.3
    hparams = {"beta": beta, "gamma": 0.4} if loss_type == "simpo" else {"beta": beta}
    state = train.create_train_state(tiny_params, optax.sgd(0.1), 0, hparams=hparams)
    m = jax.jit(train.make_dpo_eval(tiny_model, loss_type=loss_type))(state, batch)
    (c_sum, c, _), (_, r, _) = logps["chosen"], logps["rejected"]
    assert 0 < np.mean(c > r) < 1  # the case tells the sides apart
    want = {
        "rewards/chosen": beta * c.mean(),
        "rewards/rejected": beta * r.mean(),
        "rewards/accuracy": np.mean(c > r),
        "rewards/margin": beta * np.mean(c - r),
        "logps/chosen": c.mean(),
        "logps/rejected": r.mean(),
    }
    if loss_type == "orpo":

        def log_odds(p):
            return p - np.log1p(-np.exp(p))

        n_tok = batch["chosen_loss_mask"][:, 1:].sum()
        want["nll"] = -c_sum.sum() / n_tok
        want["odds_ratio_loss"] = np.mean(np.logaddexp(0.0, -(log_odds(c) - log_odds(r))))
        np.testing.assert_allclose(m["loss"], want["nll"] + beta * want["odds_ratio_loss"], 1e-5)
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_unlikelihood_logps_metrics_are_each_sides_log_probs(tiny_model, tiny_params, pairs):
    """logps/chosen and logps/rejected: the means over pairs of the summed response log-probs."""
    batch, logps = pairs
    loss_fn = train.make_unlikelihood_loss(tiny_model)
    _, m = jax.jit(lambda p, b: loss_fn(p, b, hparams={"alpha": jnp.float32(0.5)}))(
        tiny_params, batch
    )
    np.testing.assert_allclose(m["logps/chosen"], logps["chosen"][0].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["logps/rejected"], logps["rejected"][0].mean(), rtol=1e-5)


def test_sft_stage_eval_is_the_mean_over_the_held_out_batches(tmp_path, monkeypatch):
    """`stages.train_sft(eval_batches=3)`: eval/nll_token and eval/accuracy are the means over
    the first 3 batches of the test split (in order) of each batch's token-weighted NLL and
    argmax accuracy (`fit` replaced by one that only evaluates the initial state)."""
    from rlhf_jax import data as rdata
    from rlhf_jax import models, sharding, stages
    from rlhf_jax.data import synthetic, tasks
    from rlhf_jax.stages import sft as sft_stage

    task = synthetic.load_task(
        synthetic.prepare(tasks.default_data_dir(drivers.ROOT / "experiments" / "sft.py"))
    )
    tok = rdata.task_tokenizer(task)
    cfg = models.get_config("tiny", vocab_size=tok.vocab_size, max_len=16, d_model=32,
                            n_layers=1, n_heads=2)  # fmt: skip
    params = models.init_params(cfg, jax.random.PRNGKey(0))

    def evaluate_only(step, state, batches, *, eval_fn, **kwargs):
        return state, [{"step": 1, **{f"eval/{k}": v for k, v in eval_fn(state, 1).items()}}]

    monkeypatch.setattr(sft_stage.runner, "fit", evaluate_only)
    schedule = stages.Schedule(steps=1, batch_size=4, learning_rate=1e-3, decay=False)
    _, rows = stages.train_sft(
        task, cfg, params, workdir=tmp_path, mesh=sharding.make_mesh(), schedule=schedule,
        max_length=16,
        eval_batches=3, progress=False,
    )  # fmt: skip
    held_out = rdata.task_loaders(
        task, "demonstration", batch_size=4, max_length=16, max_prompt_length=15, seed=0,
        split="test", shuffle=False,
    )  # fmt: skip
    fwd = jax.jit(lambda tok, m: models.Transformer(cfg).apply({"params": params}, tok, m))
    nll, acc = [], []
    for _ in range(3):
        batch = next(held_out)
        logp = _log_softmax(fwd(batch["tokens"], batch["attention_mask"]))[:, :-1]
        targets, live = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:] > 0
        picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        nll.append(-picked[live].mean())
        acc.append((logp.argmax(-1) == targets)[live].mean())
    assert np.ptp(nll) > 1e-3  # the batches differ: a mean of one batch would show
    assert rows[-1]["eval/nll_token"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert rows[-1]["eval/accuracy"] == pytest.approx(np.mean(acc), abs=1e-6)
