"""Tests of rlhf_jax.eval against NumPy loops, closed forms and constructed known-answer cases.

One tiny decoder (vocab 16) and one chunk shape (64 rows) are shared, so the compiled evaluation
program is built once; temperatures are traced and reuse it.
"""

import math

import jax
import numpy as np
import pytest

from rlhf_jax import eval as ev
from rlhf_jax.models import RewardModel, Transformer, TransformerConfig, init_params

V, P, N, B = 16, 4, 6, 64  # vocab, prompt length, new tokens, rows per compiled call
EOS = 0
BEST = 7  # the token the constructed policy always emits
CFG = TransformerConfig(vocab_size=V, max_len=16, d_model=16, n_layers=1, n_heads=2)
MODEL = Transformer(CFG)


class CharTokenizer:
    """Token id i <-> the letter chr(97 + i); EOS (id 0) decodes to nothing."""

    def decode_batch(self, seqs):
        return ["".join(chr(97 + i) for i in s if i != EOS) for s in seqs]


def _prompts(n_rows, seed=0):
    """LEFT-padded prompts of 1..P tokens drawn from ids 1..V-1 except BEST."""
    rng = np.random.default_rng(seed)
    allowed = np.array([i for i in range(1, V) if i != BEST])
    tokens = np.full((n_rows, P), EOS, np.int32)
    mask = np.zeros((n_rows, P), np.int32)
    for b, length in enumerate(rng.integers(1, P + 1, n_rows)):
        tokens[b, P - length :] = rng.choice(allowed, length)
        mask[b, P - length :] = 1
    return {"prompt_tokens": tokens, "prompt_mask": mask}


@pytest.fixture(scope="module")
def params():
    policy = init_params(CFG, jax.random.key(0))
    ref = init_params(CFG, jax.random.key(1))
    # A reference far from the policy (larger logits), so that KLs are O(1).
    ref = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 40.0 if "'embed'" in jax.tree_util.keystr(path) else x, ref
    )
    return policy, ref


def _best_token_params(params):
    """Params whose next-token distribution is (numerically) one-hot on BEST at every position:
    the final norm outputs the constant e_0 and embed[:, 0] is 100 at BEST, 0 elsewhere."""
    params = jax.tree.map(np.array, params)
    params["final_norm"]["scale"][:] = 0.0
    params["final_norm"]["bias"][:] = 0.0
    params["final_norm"]["bias"][0] = 1.0
    params["embed"]["embedding"][:, 0] = 0.0
    params["embed"]["embedding"][BEST, 0] = 100.0
    return params


def _evaluate(policy, ref, batch, seed=0, temperature=1.0, **kw):
    kw.setdefault("reward_fn", lambda texts: np.array([len(t) for t in texts], np.float32))
    kw.setdefault("tokenizer", CharTokenizer())
    kw.setdefault("batch_size", B)
    return ev.evaluate_reward_kl(
        MODEL,
        policy,
        ref,
        batch,
        jax.random.key(seed),
        sampling=ev.SamplingConfig(N, temperature),
        eos_id=EOS,
        pad_id=EOS,
        **kw,
    )


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Pure helpers.


def test_mean_and_stderr_matches_loop():
    x = np.random.default_rng(0).normal(size=37)
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / (len(x) - 1)
    got_mean, got_stderr = ev.mean_and_stderr(x)
    assert got_mean == pytest.approx(mean, rel=1e-12)
    assert got_stderr == pytest.approx(math.sqrt(var / len(x)), rel=1e-12)
    assert ev.mean_and_stderr(np.full(5, 2.0)) == (2.0, 0.0)
    assert math.isnan(ev.mean_and_stderr(np.array([1.0]))[1])


def test_masked_sequence_sum_matches_loop():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    mask = (rng.random((5, 7)) < 0.6).astype(np.int32)
    mask[2] = 0  # an empty row sums to 0
    x[mask == 0] = np.nan  # masked values never leak
    expected = [sum(float(x[b, t]) for t in range(7) if mask[b, t]) for b in range(5)]
    np.testing.assert_allclose(ev.masked_sequence_sum(x, mask), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(ev.masked_sequence_sum)(x, mask), expected, rtol=1e-6)


def test_sequence_kl_matches_loop():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 5, 6)).astype(np.float32)
    ref_logits = 2 * rng.normal(size=(3, 5, 6)).astype(np.float32)
    tokens = rng.integers(0, 6, (3, 5)).astype(np.int32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int32)
    got = ev.sequence_kl(logits, ref_logits, tokens, mask)
    lp, lq = _np_log_softmax(logits), _np_log_softmax(ref_logits)
    for b in range(3):
        exact = k1 = k3 = 0.0
        for t in range(5):
            if not mask[b, t]:
                continue
            exact += sum(math.exp(lp[b, t, v]) * (lp[b, t, v] - lq[b, t, v]) for v in range(6))
            log_r = lq[b, t, tokens[b, t]] - lp[b, t, tokens[b, t]]
            k1 += -log_r
            k3 += math.exp(log_r) - 1 - log_r
        assert float(got.exact[b]) == pytest.approx(exact, rel=1e-5, abs=1e-6)
        assert float(got.k1[b]) == pytest.approx(k1, rel=1e-5, abs=1e-6)
        assert float(got.k3[b]) == pytest.approx(k3, rel=1e-5, abs=1e-6)
    assert np.all(np.asarray(got.logps)[mask == 0] == 0)


# ---------------------------------------------------------------------------------------------
# Reward vs KL on constructed cases.


def test_identical_policies_have_zero_kl(params):
    policy, _ = params
    result = _evaluate(policy, policy, _prompts(B))
    assert np.all(result.kl == 0.0)
    assert np.all(result.kl_k1 == 0.0) and np.all(result.kl_k3 == 0.0)
    assert (result.kl_mean, result.kl_k1_mean, result.kl_k3_mean) == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(result.logps, result.ref_logps)
    assert result.mask.sum() > 0 and result.mask.sum() < result.mask.size  # some rows hit EOS


def test_policy_that_always_emits_the_best_text_gets_the_maximal_reward(params):
    policy = _best_token_params(params[0])
    batch = _prompts(B, seed=3)

    def reward_fn(texts):  # 1.0 iff the N completion letters are all BEST (prompts never are)
        return np.array([t.count(chr(97 + BEST)) / N for t in texts], np.float32)

    def token_reward_fn(tokens, mask):
        return ((tokens == BEST) & (mask > 0)).sum(axis=1) / N

    result = _evaluate(policy, params[1], batch, reward_fn=reward_fn)
    assert np.all(result.tokens == BEST) and np.all(result.mask == 1)
    assert result.reward_mean == 1.0 and result.reward_stderr == 0.0
    assert np.all(result.rewards == 1.0)
    prompt = "".join(chr(97 + i) for i in batch["prompt_tokens"][5] if i != EOS)
    assert result.texts[5] == prompt + chr(97 + BEST) * N
    assert result.completions[5] == chr(97 + BEST) * N
    # The same with a token-level reward and no tokenizer.
    by_tokens = _evaluate(
        policy, params[1], batch, reward_fn=None, token_reward_fn=token_reward_fn, tokenizer=None
    )
    assert by_tokens.reward_mean == 1.0 and by_tokens.reward_stderr == 0.0
    assert by_tokens.texts is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_matches_numpy_on_a_teacher_forced_forward(params, temperature):
    policy, ref = params
    batch = _prompts(B, seed=4)
    result = _evaluate(policy, ref, batch, temperature=temperature)
    seq = np.concatenate([batch["prompt_tokens"], result.tokens], axis=1)
    seq_mask = np.concatenate([batch["prompt_mask"], result.mask], axis=1)
    # Full forwards of each model (independent of eval's sliced output layer).
    forward = jax.jit(MODEL.apply)
    lp = _np_log_softmax(forward({"params": policy}, seq, seq_mask)[:, P - 1 : -1] / temperature)
    lq = _np_log_softmax(forward({"params": ref}, seq, seq_mask)[:, P - 1 : -1] / temperature)
    exact, k1, k3 = np.zeros(B), np.zeros(B), np.zeros(B)
    for b in range(B):
        for i in range(N):
            if result.mask[b, i]:
                y = result.tokens[b, i]
                exact[b] += np.sum(np.exp(lp[b, i]) * (lp[b, i] - lq[b, i]))
                log_r = lq[b, i, y] - lp[b, i, y]
                k1[b] += -log_r
                k3[b] += np.expm1(log_r) - log_r
    assert exact.mean() > 0.1  # a far reference: a meaningful check
    np.testing.assert_allclose(result.kl, exact, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(result.kl_k1, k1, rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(result.kl_k3, k3, rtol=2e-4, atol=1e-4)
    assert result.kl_mean == pytest.approx(exact.mean(), rel=2e-4)
    assert result.kl_stderr == pytest.approx(exact.std(ddof=1) / math.sqrt(B), rel=1e-3)
    assert result.temperature == temperature


def test_k1_and_k3_are_unbiased_for_the_exact_kl(params):
    policy, ref = params
    result = _evaluate(policy, ref, _prompts(16 * B, seed=5), seed=5)
    for estimate in (result.kl_k1, result.kl_k3):
        diff_mean, diff_stderr = ev.mean_and_stderr(estimate - result.kl)
        assert abs(diff_mean) < 4 * diff_stderr, (diff_mean, diff_stderr)
    assert result.kl_mean > 0.1
    assert result.kl_stderr < result.kl_k3_stderr < result.kl_k1_stderr  # Rao-Blackwellised


def test_chunks_are_deterministic_and_padded(params):
    policy, ref = params
    batch = _prompts(B + 36, seed=6)
    whole = _evaluate(policy, ref, batch)  # two chunks, the second padded from 36 to 64 rows
    first = _evaluate(policy, ref, {k: v[:B] for k, v in batch.items()})
    assert whole.tokens.shape == (B + 36, N) and len(whole.texts) == B + 36
    np.testing.assert_array_equal(whole.tokens[:B], first.tokens)
    np.testing.assert_array_equal(whole.kl[:B], first.kl)
    assert whole.summary()["n"] == B + 36


# ---------------------------------------------------------------------------------------------
# Win rates.


def test_win_rate_matches_loop():
    rng = np.random.default_rng(7)
    p = rng.integers(0, 4, 50).astype(np.float32)  # many ties
    r = rng.integers(0, 4, 50).astype(np.float32)
    wins = [1.0 if a > c else 0.5 if a == c else 0.0 for a, c in zip(p, r)]
    got = ev.win_rate(p, r)
    assert got.rate == pytest.approx(np.mean(wins))
    assert got.stderr == pytest.approx(np.std(wins, ddof=1) / math.sqrt(50))
    np.testing.assert_array_equal(got.wins, wins)
    assert ev.win_rate(np.ones(3), np.zeros(3)).rate == 1.0


def test_win_rate_sweep(params):
    policy, ref = params
    batch = _prompts(B, seed=8)
    judge = lambda texts: np.array([t.count("b") for t in texts], np.float32)  # noqa: E731
    references = ["b" * 2] * B
    rows = ev.win_rate_sweep(
        MODEL,
        policy,
        ref,
        batch,
        references,
        jax.random.key(9),
        temperatures=[0.5, 1.0],
        judge_fn=judge,
        tokenizer=CharTokenizer(),
        sampling=ev.SamplingConfig(N),
        eos_id=EOS,
        pad_id=EOS,
        batch_size=B,
    )
    assert [row["temperature"] for row in rows] == [0.5, 1.0]
    direct = _evaluate(policy, ref, batch, seed=9, temperature=1.0, reward_fn=judge)
    expected = ev.win_rate(direct.rewards, judge(references))
    assert rows[1]["win_rate"] == expected.rate and rows[1]["win_rate_stderr"] == expected.stderr
    assert rows[1]["kl_mean"] == direct.kl_mean


# ---------------------------------------------------------------------------------------------
# Best-of-N.


def test_best_of_n_kl_closed_form_by_quadrature():
    # Quantile density of the best of n uniforms is n u^(n-1); KL to uniform = ∫ f log f.
    u = (np.arange(200_000) + 0.5) / 200_000
    for n in (1, 2, 4, 16, 64):
        log_f = math.log(n) + (n - 1) * np.log(u)
        assert ev.best_of_n_kl(n) == pytest.approx(np.mean(np.exp(log_f) * log_f), abs=1e-4)
    with pytest.raises(ValueError):
        ev.best_of_n_kl(0)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_best_of_n_probs_matches_monte_carlo(n):
    probs = np.array([0.1, 0.3, 0.2, 0.15, 0.25])
    rewards = np.array([0.5, -1.0, 2.0, 0.5, 0.0])  # a tie between outcomes 0 and 3
    exact = ev.best_of_n_probs(probs, rewards, n)
    rng = np.random.default_rng(n)
    draws = rng.choice(5, size=(200_000, n), p=probs)  # [S, n]
    best = draws[np.arange(len(draws)), np.argmax(rewards[draws], axis=1)]  # first maximal draw
    freq = np.bincount(best, minlength=5) / len(draws)
    np.testing.assert_allclose(exact.sum(), 1.0, atol=1e-12)
    np.testing.assert_allclose(freq, exact, atol=4e-3)
    if n == 1:
        np.testing.assert_allclose(exact, probs, atol=1e-12)


def test_best_of_n_kl_is_the_continuous_limit_of_the_exact_kl():
    for n in (2, 4, 16, 64):
        for k in (10, 100_000):
            probs = np.full(k, 1.0 / k)
            bon = ev.best_of_n_probs(probs, np.arange(k, dtype=np.float64), n)
            kl = float(np.sum(np.where(bon > 0, bon * np.log(bon / probs), 0.0)))
            assert kl <= ev.best_of_n_kl(n) + 1e-9  # an upper bound (Beirami et al. 2024)
            if k == 100_000:
                assert kl == pytest.approx(ev.best_of_n_kl(n), abs=2e-3)


def test_best_of_n_selects_the_best_candidate(params):
    policy, _ = params
    batch = _prompts(B // 4, seed=10)
    reward_model = RewardModel(CFG)
    head = np.random.default_rng(11).normal(size=(CFG.d_model, 1)).astype(np.float32)
    reward_params = {
        "transformer": policy,
        "head": {"kernel": head, "bias": np.zeros(1, np.float32)},
    }
    score_fn = ev.reward_model_score_fn(reward_model, reward_params, batch_size=24)
    result = ev.best_of_n(
        MODEL,
        policy,
        batch,
        jax.random.key(12),
        n=4,
        sampling=ev.SamplingConfig(N),
        score_fn=score_fn,
        reward_fn=lambda texts: np.array([len(t) for t in texts], np.float32),
        tokenizer=CharTokenizer(),
        eos_id=EOS,
        pad_id=EOS,
    )
    assert result.all_scores.shape == (B // 4, 4) and result.tokens.shape == (B // 4, N)
    np.testing.assert_array_equal(result.scores, result.all_scores.max(axis=1))
    assert len(set(result.index.tolist())) > 1
    # The chosen completions, re-scored by the reward model, give the reported scores.
    seq = np.concatenate([batch["prompt_tokens"], result.tokens], axis=1)
    seq_mask = np.concatenate([batch["prompt_mask"], result.mask], axis=1)
    rescored = jax.jit(reward_model.apply)({"params": reward_params}, seq, seq_mask)
    np.testing.assert_allclose(rescored, result.scores, rtol=1e-5, atol=1e-6)
    assert result.kl == pytest.approx(math.log(4) - 3 / 4)
    np.testing.assert_allclose(result.rewards, [len(t) for t in result.texts])
    assert result.reward_mean == pytest.approx(np.mean(result.rewards))
