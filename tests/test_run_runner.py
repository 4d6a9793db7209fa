"""rlhf_jax.runner: fit (resume, NaN stop, one trace), run config, mesh/batch checks, model
hand-over between stages, preference pairs, reference log-probs and pair accuracy.

fit runs a least-squares toy step on the 8 forced CPU devices (conftest); the model-level
helpers run the "tiny" transformer with a 40-token vocabulary.
"""

import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers

from rlhf_jax import data, models, train
from rlhf_jax import eval as ev
from rlhf_jax import pairs as pairs_lib
from rlhf_jax.data import tasks
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import cli, handover, runner
from rlhf_jax.run.metrics_writer import read_metrics
from rlhf_jax.sampling import SamplingConfig

# ---------------------------------------------------------------------------------------------
# fit on a toy step.

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


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class _Config:
    workdir: str = "w"
    steps: int = 10
    learning_rate: float = 1e-3
    betas: tuple[float, ...] = (0.1, 1.0)
    init_from: str | None = None


def test_parse_config_presets_and_overrides():
    presets = {"default": _Config(), "tiny": _Config(steps=2)}
    assert cli.parse_config(_Config, presets, []) == _Config()
    cfg = cli.parse_config(_Config, presets, ["--preset", "tiny", "--learning-rate", "0.5"])
    assert cfg == _Config(steps=2, learning_rate=0.5)
    cfg = cli.parse_config(_Config, presets, ["--steps", "3", "--preset=tiny"])
    assert cfg == _Config(steps=3)
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*default, tiny"):
        cli.parse_config(_Config, presets, ["--preset", "huge"])


def test_write_run_config_allows_steps_and_names_other_differences(tmp_path):
    cli.write_run_config(tmp_path, _Config())
    stored = json.loads((tmp_path / handover.RUN_CONFIG).read_text())
    assert stored == {**dataclasses.asdict(_Config()), "betas": [0.1, 1.0]}
    cli.write_run_config(tmp_path, _Config())
    cli.write_run_config(tmp_path, _Config(steps=20, workdir="elsewhere"))
    with pytest.raises(ConfigError, match=r"betas: \[0.1, 1.0\] -> \[0.2\].*learning_rate"):
        cli.write_run_config(tmp_path, _Config(learning_rate=1.0, betas=(0.2,)))


def test_resolve_mesh_and_check_batch():
    assert jax.device_count() == 8
    mesh = cli.resolve_mesh("data=2,fsdp=4")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(cli.resolve_mesh("tensor=2").shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ConfigError, match="impossible mesh for 8 devices: .*product is 8"):
        cli.resolve_mesh("data=3")
    with pytest.raises(ConfigError, match="impossible mesh for 8 devices: bad mesh spec"):
        cli.resolve_mesh("model=8")
    assert cli.check_batch(16, mesh) == 16
    with pytest.raises(ConfigError, match="--batch-size: batch size 12 .* multiple of 8"):
        cli.check_batch(12, mesh)


# ---------------------------------------------------------------------------------------------
# Models between stages, pairs, reference log-probs.

_WORDS = ["good", "bad", "great", "awful", "film", "plot", "the", "was", "a", "fine"]


def _make_tokenizer():
    vocab = {"<|endoftext|>": 0}
    for w in _WORDS:
        vocab[w] = len(vocab)
        vocab["Ġ" + w] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return data.Tokenizer(backend)


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def lm():
    cfg = models.get_config("tiny", vocab_size=32, max_len=32, d_model=32)
    return cfg, jax.device_get(models.init_params(cfg, jax.random.PRNGKey(0)))


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_models_round_trip_through_workdirs_and_hf_folders(tmp_path, lm, tok):
    cfg, params = lm
    cli.write_run_config(tmp_path / "sft", _Config())
    with pytest.raises(ConfigError, match="workdir without hf/: run its stage"):
        handover.load_init_params(tmp_path / "sft")
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    folder = handover.save_lm(tmp_path / "sft", bf16, params, tokenizer=tok)
    assert folder == tmp_path / "sft" / "hf" and (folder / "tokenizer.json").is_file()
    got_cfg, got = handover.load_init_params(tmp_path / "sft")
    assert got_cfg == bf16  # dtype kept through model_config.json
    _assert_tree_equal(got, params)
    got_cfg, got = handover.load_init_params(folder, dtype="float32")  # the HF folder itself
    assert got_cfg == cfg
    _assert_tree_equal(got, params)

    rm_params = jax.device_get(models.init_reward_params(cfg, jax.random.PRNGKey(1), params))
    handover.save_reward_model(tmp_path / "rm", cfg, rm_params)
    _assert_tree_equal(handover.load_reward_model(tmp_path / "rm")[1], rm_params)
    _assert_tree_equal(handover.load_init_params(tmp_path / "rm")[1], params)  # its trunk
    with pytest.raises(ConfigError, match="Hugging Face model folder .*head.safetensors"):
        handover.load_reward_model(tmp_path / "sft" / "hf")
    with pytest.raises(ConfigError, match="no such file or folder"):
        handover.load_init_params(tmp_path / "missing")
    handover.check_model(cfg, tok, max_length=32)
    with pytest.raises(ConfigError, match="model's vocabulary \\(8\\) is smaller"):
        handover.check_model(dataclasses.replace(cfg, vocab_size=8), tok, max_length=32)
    with pytest.raises(ConfigError, match="rows of 33 tokens exceed the model's context"):
        handover.check_model(cfg, tok, max_length=33)


def test_make_preference_pairs_labels_every_pair_and_caches(tmp_path, lm, tok):
    cfg, params = lm
    prompts = ["the film", "a plot was", "fine"]
    seen = []

    def reward_fn(texts):
        seen.extend(texts)
        return np.array([float(t.count("good") - t.count("bad")) for t in texts], np.float32)

    kwargs = dict(
        completions_per_prompt=4,
        sampling=SamplingConfig(max_new_tokens=6),
        reward_fn=reward_fn,
        batch_size=5,
    )
    cache = tmp_path / "pairs.jsonl"
    pairs = pairs_lib.make_preference_pairs(
        models.Transformer(cfg), params, prompts, tok, jax.random.PRNGKey(0),
        cache_path=cache, **kwargs,
    )  # fmt: skip
    assert len(seen) == 12 and all(t.startswith(prompts[i // 4]) for i, t in enumerate(seen))
    # Independent labelling of the k(k-1)/2 pairs of each prompt from the texts that were scored.
    expected = []
    for p, prompt in enumerate(prompts):
        done = [t[len(prompt) :] for t in seen[4 * p : 4 * p + 4]]
        for a, b in itertools.combinations(range(4), 2):
            ra, rb = reward_fn([prompt + done[a], prompt + done[b]])
            if done[a].strip() and done[b].strip() and ra != rb:
                win, lose = (done[a], done[b]) if ra > rb else (done[b], done[a])
                expected.append((prompt, win, lose))
    assert [(r.prompt, r.chosen, r.rejected) for r in pairs] == expected
    assert all(r.metadata["chosen_reward"] > r.metadata["rejected_reward"] for r in pairs)
    # A rerun reads the cache and samples nothing.
    seen.clear()
    again = pairs_lib.make_preference_pairs(
        models.Transformer(cfg), params, prompts, tok, jax.random.PRNGKey(0),
        cache_path=cache, **kwargs,
    )  # fmt: skip
    assert seen == [] and [(r.prompt, r.chosen, r.rejected) for r in again] == expected


_PAIRS = [
    data.PreferenceRecord("the film", " was good", " was bad"),
    data.PreferenceRecord("a plot", " fine", " awful the plot"),
    data.PreferenceRecord("the", " great film", " bad"),
]


def _rows(lengths):
    """Every (pair, side) of _PAIRS as (unpadded tokens, loss mask), tokenized one at a time."""
    out = []
    for r in _PAIRS:
        row = data.tokenize_preference(_make_tokenizer(), r.prompt, r.chosen, r.rejected, **lengths)
        for side in ("chosen", "rejected"):
            n = int(row[f"{side}_attention_mask"].sum())
            out.append((row[f"{side}_tokens"][:n], row[f"{side}_loss_mask"][:n]))
    return out


def _hidden(cfg, params, rows):
    """Final hidden states of each row on its own: right-padded without a mask (causal, so the
    first n positions are those of the unpadded row)."""
    t = max(len(tokens) for tokens, _ in rows)
    batch = np.zeros((len(rows), t), np.int32)
    for i, (tokens, _) in enumerate(rows):
        batch[i, : len(tokens)] = tokens
    fwd = jax.jit(lambda p, x: models.Transformer(cfg).apply({"params": p}, x, method="hidden"))
    return np.asarray(fwd(params, batch), np.float64)


def test_preference_accuracy_and_attach_reference_match_one_pair_at_a_time(lm, tok, tmp_path):
    cfg, params = lm
    lengths = dict(max_length=12, max_prompt_length=4)
    rows = _rows(lengths)
    rm_params = jax.device_get(models.init_reward_params(cfg, jax.random.PRNGKey(3), params))
    h = _hidden(cfg, rm_params["transformer"], rows)
    head = rm_params["head"]
    scores = [
        h[i, len(tok_ids) - 1] @ head["kernel"][:, 0] + head["bias"][0]
        for i, (tok_ids, _) in enumerate(rows)
    ]
    margins = np.array(scores[0::2]) - np.array(scores[1::2])  # chosen - rejected
    rm = models.RewardModel(cfg)
    got = ev.preference_accuracy(rm, rm_params, _PAIRS, tok, batch_size=2, **lengths)
    assert got["accuracy"] == pytest.approx(np.mean(margins > 0))
    assert got["margin"] == pytest.approx(np.mean(margins), abs=1e-5)

    model = models.Transformer(cfg)
    cache = tmp_path / "ref.npz"
    collate = functools.partial(data.collate_preferences, tokenizer=tok, buckets=None, **lengths)
    dicts = [data.record_to_dict(r) for r in _PAIRS]
    recs = train.attach_reference(model, params, dicts, collate, batch_size=2, cache_path=cache)
    logits = _hidden(cfg, params, rows) @ np.asarray(params["embed"]["embedding"], np.float64).T
    logps = []
    for i, (tokens, loss_mask) in enumerate(rows):
        lse = np.log(np.exp(logits[i]).sum(-1))  # [T]
        logps.append(
            sum(
                logits[i, t, tokens[t + 1]] - lse[t]
                for t in range(len(tokens) - 1)
                if loss_mask[t + 1]
            )
        )
    for j, (r, rec) in enumerate(zip(_PAIRS, recs)):
        assert (rec["prompt"], rec["chosen"], rec["rejected"]) == (r.prompt, r.chosen, r.rejected)
        assert rec["reference_chosen_logps"] == pytest.approx(logps[2 * j], rel=1e-5)
        assert rec["reference_rejected_logps"] == pytest.approx(logps[2 * j + 1], rel=1e-5)
    assert train.attach_reference(model, None, dicts, collate, cache_path=cache) == recs


def test_task_loaders_give_fixed_shapes(lm, tok):
    class Task:
        train = [{"text": "the film was good"}, {"text": "a bad plot"}] * 4
        test = train
        train_prompts = ["the film", "a", "the plot was", "fine"] * 2
        test_prompts = train_prompts

    kw = dict(tokenizer=tok, batch_size=4, max_length=10, max_prompt_length=3, seed=0)
    demo = next(tasks.task_loaders(Task, "demonstration", **kw))
    assert demo["tokens"].shape == (4, 10)
    rows = {tuple(t[m > 0]) for t, m in zip(demo["tokens"], demo["loss_mask"])}
    assert rows <= {tuple(tok.encode(r["text"]) + [tok.eos_id]) for r in Task.train}
    prompts = next(tasks.task_loaders(Task, "prompt", split="test", **kw))
    assert prompts["prompt_tokens"].shape == (4, 3)
    prefs = next(tasks.task_loaders(Task, "preference", records=_PAIRS * 2, **kw))
    assert prefs["chosen_tokens"].shape == prefs["rejected_tokens"].shape == (4, 10)
    with pytest.raises(ValueError, match="make_preference_pairs"):
        tasks.task_loaders(Task, "preference", **kw)
