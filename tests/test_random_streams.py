"""Random streams: a key that must be fresh is fresh, a key that must repeat repeats.

- the PPO and critic-free rollouts sample new completions at each iteration (`state.step`) with
  the same params, and the same completions for the same step (a resumed run), PPO's with the
  documented key `fold_in(fold_in(rng, step), 0)`;
- PPO's minibatches are a fresh partition of the rollout at every epoch and every iteration
  (each partition read back from the update by replaying the candidates by hand);
- a keyed loss gets `fold_in(fold_in(rng, step), RNG_LOSS)` from `make_step`, and microbatch i
  of an accumulated step `fold_in(that, i)`: different noise per step and per microbatch;
- LoRA dropout draws a different mask in every layer, scanned (`scan_layers`) or unrolled, the
  same masks for the same key (scanned and unrolled draw different masks: not a contract);
- every LoRA adapter starts from a draw of its own;
- preference pairs of the train and test splits, and of two seeds, use different keys;
- evaluation's chunks of rows draw from different keys (the same prompts in two chunks get
  different completions), and the first chunk's draws do not depend on the number of rows.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_lm

from rlhf_jax import eval as ev
from rlhf_jax import lora, models, pairs, train
from rlhf_jax.sampling import generate

N, EOS, PAD = 5, 3, 0
PROMPTS = {  # LEFT-padded, P = 4
    "prompt_tokens": np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13], [0, 0, 0, 14]]),
    "prompt_mask": np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
}
P = PROMPTS["prompt_tokens"].shape[1]


_jitter = tiny_lm.jitter


def _differ(a, b) -> bool:
    return bool(np.any(np.asarray(a) != np.asarray(b)))


# ---------------------------------------------------------------------------------------------
# Rollouts: a fresh sample per iteration, the same one per step.


@pytest.fixture(scope="module")
def policy(tiny):
    return tiny().model, _jitter(tiny().params, 1)


def _ppo_state(model, params, cfg, seed=7, step=0):
    value = models.init_value_params(model.config, jax.random.key(2), params)
    tx = optax.sgd(0.1)
    state = train.create_ppo_state(
        cfg, policy_params=params, value_params=value, ref_params=params, policy_optimizer=tx,
        value_optimizer=tx, rng=seed,
    )  # fmt: skip
    return state.replace(step=jnp.int32(step))


def test_ppo_rollout_samples_afresh_each_iteration_and_repeats_a_step(policy):
    model, params = policy
    cfg = train.PPOConfig(max_new_tokens=N, temperature=1.0, eos_id=EOS, pad_id=PAD)
    rollout = jax.jit(train.make_ppo_rollout(model, models.ValueModel(model.config), cfg))

    def sample(step, seed=7):
        state = _ppo_state(model, params, cfg, seed=seed, step=step)
        return np.asarray(rollout(state, PROMPTS)[1].response_tokens)

    tokens = {s: sample(s) for s in (0, 1, 5)}
    assert _differ(tokens[0], tokens[1]) and _differ(tokens[1], tokens[5])
    assert _differ(tokens[0], tokens[5])
    # The same step (a resumed run: a new state object) samples the same completions, with the
    # key the rollout documents: fold_in(fold_in(rng, step), 0).
    np.testing.assert_array_equal(sample(1), tokens[1])
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), 1), 0)
    gen = jax.jit(generate, static_argnums=0, static_argnames=("max_new_tokens", "eos_id"))(
        model, params, PROMPTS["prompt_tokens"], PROMPTS["prompt_mask"], key, max_new_tokens=N,
        temperature=1.0, eos_id=EOS,
    )  # fmt: skip
    np.testing.assert_array_equal(gen.tokens, tokens[1])
    assert _differ(sample(1, seed=8), tokens[1])


def test_critic_free_rollout_samples_afresh_each_iteration_and_repeats_a_step(policy):
    model, params = policy
    cfg = train.CriticFreeConfig(
        algo="grpo", group_size=2, max_new_tokens=N, eos_id=EOS, pad_id=PAD
    )
    tx = optax.sgd(0.1)
    rollout = jax.jit(train.make_critic_free(model, tx, cfg).rollout)

    def sample(step, seed=3):
        state = train.create_critic_free_state(params, tx, seed).replace(step=jnp.int32(step))
        return np.asarray(rollout(state, PROMPTS)[1].response_tokens)

    tokens = {s: sample(s) for s in (0, 1, 2)}  # one update of 2 minibatches: step 0 -> 2
    assert _differ(tokens[0], tokens[1]) and _differ(tokens[1], tokens[2])
    assert _differ(tokens[0], tokens[2])
    np.testing.assert_array_equal(sample(1), tokens[1])  # resumed at step 1
    assert _differ(sample(1, seed=4), tokens[1])
    # The G completions of a prompt are draws of their own (rows p * G + g).
    assert all(_differ(tokens[0][2 * p], tokens[0][2 * p + 1]) for p in range(4))


# ---------------------------------------------------------------------------------------------
# PPO's minibatches: a fresh partition per epoch and per iteration.

B_MB, EPOCHS, LR = 4, 2, 0.3
HALVES = [  # the 6 ordered splits of rows 0..3 into two minibatches of 2
    (first, tuple(sorted(set(range(B_MB)) - set(first))))
    for first in itertools.combinations(range(B_MB), 2)
]


@pytest.fixture(scope="module")
def ppo_update_case(policy):
    """A rollout of 4 rows with random advantages, returns and old log-probs, the state, the
    update (2 epochs of 2 minibatches) and its minibatch step replayed by hand."""
    model, params = policy
    cfg = train.PPOConfig(
        ppo_epochs=EPOCHS, num_minibatches=2, max_new_tokens=N, eos_id=EOS, pad_id=PAD,
        kl_coef=0.0,
    )  # fmt: skip
    rs = np.random.default_rng(0)
    q_tok = np.asarray(PROMPTS["prompt_tokens"], np.int32)
    q_mask = np.asarray(PROMPTS["prompt_mask"], np.int32)
    r_tok = rs.integers(1, 40, (B_MB, N)).astype(np.int32)
    r_mask = np.ones((B_MB, N), np.int32)
    f = lambda: jnp.asarray(rs.normal(size=(B_MB, N)), jnp.float32)  # noqa: E731
    ro = train.Rollout(
        query_tokens=q_tok, query_mask=q_mask, response_tokens=r_tok, response_mask=r_mask,
        sample_logps=f() - 4, logps=f() * 0.3 - 4, ref_logps=f() - 4, values=f(),
        kl_exact=jnp.zeros((B_MB, N)), has_eos=np.zeros(B_MB, np.int32),
        scores=jnp.zeros(B_MB), rewards=jnp.zeros((B_MB, N)), advantages=f(), returns=f(),
    )  # fmt: skip
    value_model = models.ValueModel(model.config)
    state = _ppo_state(model, params, cfg)
    tx = optax.sgd(LR)
    update = jax.jit(train.make_ppo_update(model, value_model, tx, tx, cfg))
    loss_fn = train.make_ppo_loss(model, value_model, cfg)
    fields = ("query_tokens", "query_mask", "response_tokens", "response_mask", "logps",
              "values", "advantages", "returns")  # fmt: skip
    data = {k: jnp.asarray(getattr(ro, k)) for k in fields}

    def replay(joint, order):  # order [steps, 2]: the rows of each minibatch, in turn
        def one(joint, rows):
            grads = jax.grad(lambda p: loss_fn(p, jax.tree.map(lambda x: x[rows], data))[0])(joint)
            return jax.tree.map(lambda p, g: p - LR * g, joint, grads), None

        return jax.lax.scan(one, joint, order)[0]

    # Every candidate at once: [C, steps, 2] orders -> C replays.
    return state, ro, update, jax.jit(jax.vmap(replay, in_axes=(None, 0)))


def _partitions(case, step, identify=True):
    """(the (epoch 0, epoch 1) ordered splits the update at `step` used: the one candidate whose
    replay by hand lands on the update's params, those params)."""
    state, ro, update, replay = case
    state = state.replace(step=jnp.int32(step))
    new, _ = update(jax.tree.map(jnp.copy, state), ro)
    got = (new.policy_params, new.value_params)
    if not identify:
        return None, got
    joint = (state.policy_params, state.value_params)
    seqs = list(itertools.product(range(len(HALVES)), repeat=EPOCHS))
    orders = jnp.asarray([[rows for i in seq for rows in HALVES[i]] for seq in seqs], jnp.int32)
    wants = replay(joint, orders)
    gaps = [
        jnp.max(jnp.abs(w - a[None]), axis=tuple(range(1, w.ndim)))
        for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(wants))
    ]
    errors = dict(zip(seqs, np.max(np.stack(gaps), axis=0).tolist()))
    ranked = sorted(errors, key=errors.get)
    assert errors[ranked[0]] < 1e-4 and errors[ranked[1]] > 1e-2, (
        errors[ranked[0]],
        errors[ranked[1]],
    )
    return ranked[0], got


def test_ppo_minibatches_are_a_fresh_partition_per_epoch_and_per_iteration(ppo_update_case):
    """Each epoch is a permutation of the rollout's rows cut into minibatches (one candidate
    replays the update exactly), drawn anew for every epoch and every iteration; the same step
    repeats its partitions (a resumed run)."""
    found = {s: _partitions(ppo_update_case, s)[0] for s in (0, 1, 2)}
    assert any(e0 != e1 for e0, e1 in found.values()), found  # epochs differ
    assert len(set(found.values())) > 1, found  # iterations differ
    _, again = _partitions(ppo_update_case, 1, identify=False)
    _, first = _partitions(ppo_update_case, 1, identify=False)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# make_step: the loss's key per step and per microbatch.


def _noise_loss(params, batch, *, frozen, hparams, rng):
    """Gradient `N(0, I)(rng) * mean(batch["x"])`: the key's draw, read back from the update."""
    del frozen, hparams
    noise = jax.random.normal(rng, params["w"].shape)
    return jnp.vdot(params["w"], noise) * jnp.mean(batch["x"]), {}


def test_make_step_draws_a_loss_key_per_step_and_per_microbatch():
    tx = optax.sgd(1.0)
    w0 = jnp.zeros(16)
    batch = {"x": jnp.asarray([1.0, 1.0, 3.0, 3.0])}  # microbatch means 1 and 3
    state = train.create_train_state({"w": w0}, tx, 11)
    documented = lambda step: jax.random.fold_in(  # noqa: E731
        jax.random.fold_in(jax.random.PRNGKey(11), step), train.step.RNG_LOSS
    )
    normal = lambda key: np.asarray(jax.random.normal(key, (16,)))  # noqa: E731
    one = jax.jit(train.make_step(_noise_loss, tx))
    two = jax.jit(train.make_step(_noise_loss, tx, microbatches=2))
    seen = []
    for step in (0, 1, 2):
        s = state.replace(step=jnp.int32(step))
        g1 = -np.asarray(one(s, batch)[0].params["w"])  # w0 = 0, lr = 1: the gradient
        np.testing.assert_allclose(g1, normal(documented(step)) * 2.0, rtol=1e-6)
        g2 = -np.asarray(two(s, batch)[0].params["w"])
        n0, n1 = (normal(jax.random.fold_in(documented(step), i)) for i in (0, 1))
        np.testing.assert_allclose(g2, (n0 * 1.0 + n1 * 3.0) / 2, rtol=1e-5, atol=1e-6)
        assert np.abs(n0 - n1).max() > 0.1  # the microbatches' draws differ
        again = -np.asarray(two(s, batch)[0].params["w"])
        np.testing.assert_array_equal(again, g2)  # the same step: the same draws
        seen.append(g1)
    assert np.abs(seen[0] - seen[1]).max() > 0.1 and np.abs(seen[1] - seen[2]).max() > 0.1


# ---------------------------------------------------------------------------------------------
# LoRA dropout: a mask per layer, scanned or not.


@pytest.mark.parametrize("scan", [False, True])
def test_lora_dropout_draws_a_fresh_mask_in_every_layer(monkeypatch, tiny, scan):
    """Every dropout mask the forward draws (each `jax.random.bernoulli`, recorded in call
    order): projection j of each of the 3 layers drops a different set of inputs."""
    layers = 3
    cfg = dataclasses.replace(tiny(n_layers=layers).config, scan_layers=scan)
    drop = lora.LoraConfig(rank=2, alpha=4.0, dropout=0.5)
    base = tiny(n_layers=layers).params
    adapters = lora.init_adapters(base, drop, jax.random.key(1))
    model = lora.LoraTransformer(cfg, drop)
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) + 4
    seen, draw = [], jax.random.bernoulli

    def recording(key, p, shape):
        m = draw(key, p, shape)
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), m, ordered=True)
        return m

    monkeypatch.setattr(jax.random, "bernoulli", recording)
    apply = jax.jit(lambda key: model.apply({"params": lora.view(adapters, base, key)}, tokens))

    def masks(key):
        seen.clear()
        jax.block_until_ready(apply(key))
        jax.effects_barrier()
        return list(seen)

    first = masks(jax.random.key(5))
    per_layer = len(first) // layers
    assert per_layer >= 4 and len(first) == per_layer * layers  # every adapted projection
    for j in range(per_layer):
        same = [first[i * per_layer + j] for i in range(layers)]
        for a, b in itertools.combinations(same, 2):
            assert a.shape == b.shape and _differ(a, b)
    for m in first:
        assert 0.3 < m.mean() < 0.7  # keep probability 1 - 0.5
    again, other = masks(jax.random.key(5)), masks(jax.random.key(6))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(_differ(a, b) for a, b in zip(first, other))


def test_lora_adapters_start_from_a_draw_of_their_own(tiny):
    """Every adapter's A is its own draw (no two projections, in one layer or across layers,
    start alike), and the same key gives the same adapters."""
    base = tiny(n_layers=2).params
    cfg = lora.LoraConfig(rank=2)
    adapters = lora.init_adapters(base, cfg, jax.random.key(3))
    a = [np.asarray(x) for x in jax.tree.leaves(adapters) if x.ndim >= 2 and np.any(x != 0)]
    assert len(a) >= 8  # the A of every adapted projection of both layers (B starts at 0)
    for x, y in itertools.combinations(a, 2):
        assert x.shape != y.shape or _differ(x, y)
    again = lora.init_adapters(base, cfg, jax.random.key(3))
    for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(again)):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# Preference pairs and evaluation.


def test_pair_keys_differ_by_split_and_seed_and_repeat():
    keys = {
        (s, split): np.asarray(pairs.pair_rng(s, split))
        for s in (0, 1)
        for split in ("train", "test")
    }
    for a, b in itertools.combinations(keys, 2):
        assert _differ(keys[a], keys[b]), (a, b)
    np.testing.assert_array_equal(pairs.pair_rng(0, "test"), keys[(0, "test")])
    want = jax.random.fold_in(jax.random.PRNGKey(1), 1)  # the documented fold_in(seed, split)
    np.testing.assert_array_equal(keys[(1, "test")], want)


def test_evaluation_chunks_draw_from_their_own_keys(policy):
    """The same 4 prompts twice, in two chunks of 4 rows: different completions; the first
    chunk's completions are those of the 4 prompts alone (key fold_in(rng, 0) either way)."""
    model, params = policy
    twice = {k: np.concatenate([v, v]) for k, v in PROMPTS.items()}
    sampling = ev.SamplingConfig(N, 1.0)
    key = jax.random.key(9)
    out = ev.sample_completions(model, params, twice, key, sampling=sampling, batch_size=4)
    assert _differ(out["tokens"][:4], out["tokens"][4:])
    alone = ev.sample_completions(model, params, PROMPTS, key, sampling=sampling)  # one chunk
    np.testing.assert_array_equal(alone["tokens"], out["tokens"][:4])
