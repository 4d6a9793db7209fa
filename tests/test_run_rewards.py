"""A user's functions by name (`plugins.load_callable`) and Python rewards on a dataset's rows
(`run.rewards`): TRL's call signature, weights, None as "not applicable", the log of every scored
row, and the prompt batches that carry each row's dataset index. Checked against sums written
here by hand."""

import json
import math
import sys

import numpy as np
import pytest

from rlhf_jax import plugins
from rlhf_jax.run import rewards as rw


def test_load_callable_from_a_module_a_file_and_a_dotted_name(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "class Box:\n    @staticmethod\n    def two(prompts, completions, **kw):\n"
        "        return [2.0] * len(completions)\n"
        "NOT_A_FUNCTION = 3\n"
    )
    (tmp_path / "broken.py").write_text("import no_such_package_here\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert plugins.load_callable("my_rewards:one")([], ["a"]) == [1.0]  # the working directory
    assert plugins.load_callable(str(tmp_path / "my_rewards.py") + ":Box.two")([], ["a"]) == [2.0]
    assert plugins.is_callable_spec("m:f") and not plugins.is_callable_spec("sigmoid")
    assert not plugins.is_callable_spec("gs://bucket/x")
    for spec, message in [
        ("one", r"--reward-fn one: expected module:function"),
        ("no_such_mod:f", r"no module 'no_such_mod' \(run from its folder"),
        ("my_rewards:three", r"my_rewards has no 'three'"),
        ("my_rewards:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not a function"),
        ("broken.py:f", r"broken.py fails to import: ModuleNotFoundError"),
        ("missing/file.py:f", r"no such file missing/file.py"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            plugins.load_callable(spec, flag="--reward-fn")
        assert str(info.value).startswith(f"--reward-fn {spec}: ")


def _fmt(prompts, completions, **kwargs):
    return [1.0 if c.startswith("7") else 0.0 for c in completions]


def _exact(prompts, completions, answer, completion_ids, **kwargs):
    assert len(completion_ids) == len(completions)
    return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer)]


def test_weighted_sum_with_none_and_each_functions_values():
    functions = rw.reward_functions([_fmt, _exact], [0.5, 2.0])
    assert functions.names == ("_fmt", "_exact") and functions.weights == (0.5, 2.0)
    completions = ["7", "8", "7 apples"]
    total, values = functions.score(["p"] * 3, completions, [[1], [2], [3]],
                                    {"answer": ["7", None, "7"]})  # fmt: skip
    np.testing.assert_allclose(values[0], [1, 0, 1])
    assert values[1, 0] == 1 and math.isnan(values[1, 1]) and values[1, 2] == 0
    np.testing.assert_allclose(total, [0.5 + 2.0, 0.0, 0.5])  # None counts 0
    assert rw.reward_functions([_fmt, _fmt]).names == ("_fmt", "_fmt_1")
    with pytest.raises(ValueError, match="--reward-weights: 1 weights for 2 reward functions"):
        rw.reward_functions([_fmt, _exact], [1.0])
    with pytest.raises(ValueError, match="reward _fmt returned 1 values for 2 completions"):
        rw.RewardFunctions((lambda **kw: [1.0],), (1.0,), ("_fmt",)).score([], ["a", "b"], [], {})
    bad = rw.RewardFunctions((lambda **kw: ["x"],), (1.0,), ("bad",))
    with pytest.raises(ValueError, match=r"reward bad returned 'x' for row 0: expected a number"):
        bad.score([], ["a"], [], {})


class _Decoder:
    """Decodes ids as the letters a, b, c, ..."""

    eos_id = 0

    def decode_batch(self, rows):
        return ["".join(chr(ord("a") + i - 1) for i in r) for r in rows]


def test_row_reward_reads_the_rows_columns_and_logs_every_row(tmp_path):
    seen = {}

    def spy(prompts, completions, completion_ids, answer, source, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, source=source)
        return [float(c == a) for c, a in zip(completions, answer)]

    rows = [
        {"prompt": "p0", "prompt_ids": [5], "answer": "ab", "source": "x"},
        {"prompt": "p1", "prompt_ids": [6], "answer": "c", "source": "y"},
    ]
    log = tmp_path / "completions.jsonl"
    reward = rw.RowReward(rw.reward_functions([spy], [3.0]), rows, _Decoder(),
                          conversational=False, log_path=log)  # fmt: skip
    samples = [(1, [3]), (0, [1, 2]), (0, [2])]
    scores = reward(samples, iteration=4)
    np.testing.assert_allclose(scores, [3.0, 3.0, 0.0])
    assert not log.exists()  # scoring writes nothing: the step logs every host's rows
    reward.log(4, [s[0] for s in samples], [s[1] for s in samples], reward.values, scores)
    assert seen == {"prompts": ["p1", "p0", "p0"], "completions": ["c", "ab", "b"],
                    "answer": ["c", "ab", "ab"], "source": ["y", "x", "x"]}  # fmt: skip
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["iteration"], r["index"], r["completion"], r["reward"]) for r in logged] == [
        (4, 1, "c", 3.0), (4, 0, "ab", 3.0), (4, 0, "b", 0.0)
    ]  # fmt: skip
    assert logged[0]["rewards"] == {"spy": 1.0}
    scores = reward([(1, [1], [6])], iteration=5)  # the prompt ids are the row's
    reward.log(5, [1], [[1]], reward.values, scores)  # appended
    assert len(log.read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="sampled from other prompt tokens than dataset row 1"):
        reward([(1, [1], [5])])

    chat = rw.RowReward(rw.reward_functions([_fmt]), rows, _Decoder(), conversational=True)
    got = []
    chat.rewards = rw.RewardFunctions(
        (lambda completions, **kw: got.append(completions) or [0.0] * len(completions),),
        (1.0,), ("c",),
    )  # fmt: skip
    chat([(0, [1])])
    assert got == [[[{"role": "assistant", "content": "a"}]]]  # TRL's conversational form


def test_a_resumed_run_logs_each_iteration_once(tmp_path):
    """A run killed during iteration 3 (its rows half written, the last line cut) and resumed
    from the checkpoint of iteration 2: the first log call drops iterations >= 3, then appends."""
    rows = [{"prompt": "p0", "prompt_ids": [5], "answer": "ab"}]
    log = tmp_path / "completions.jsonl"
    old = [{"iteration": i, "index": 0, "completion": f"c{i}"} for i in (1, 2, 3, 3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"iteration": 3, "ind')
    reward = rw.RowReward(rw.reward_functions([_fmt]), rows, _Decoder(), conversational=False,
                          log_path=log)  # fmt: skip
    for iteration in (3, 4):
        scores = reward([(0, [1])], iteration=iteration)
        reward.log(iteration, [0], [[1]], reward.values, scores)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [1, 2, 3, 4]
    assert [r["completion"] for r in logged[:2]] == ["c1", "c2"]  # kept as they were


def test_prompt_batches_carry_the_dataset_index(word_tokenizer):
    rows = [{"prompt": str(i), "prompt_ids": list(range(1, i % 5 + 2))} for i in range(6)]
    loader = rw.prompt_rows_loader(
        rows, batch_size=4, max_prompt_length=5, tokenizer=word_tokenizer, seed=3
    )
    for _ in range(3):  # epochs reshuffle; every batch is consistent
        batch = next(loader)
        assert batch["prompt_tokens"].shape == (4, 5) and batch["index"].shape == (4,)
        for tokens, mask, i in zip(batch["prompt_tokens"], batch["prompt_mask"], batch["index"]):
            assert tokens[mask > 0].tolist() == rows[i]["prompt_ids"]
            n = len(rows[i]["prompt_ids"])
            assert mask.tolist() == [0] * (5 - n) + [1] * n  # left-padded
