"""Python reward functions on a researcher's dataset, with TRL's signature, weighted, each logged.

    def exact_match(prompts, completions, answer, **kwargs):   # `answer`: a dataset column
        return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, answer)]

    rewards = reward_functions(["my_rewards:format_ok", exact_match], weights=[0.5, 1.0])
    loader = prompt_rows_loader(rows, batch_size=8, max_prompt_length=64, tokenizer=tok, seed=0)
    stages.train_critic_free(cfg, params, loader, tokenizer=tok, **host_reward(rewards, rows, tok,
                                                                            workdir), ...)

A reward function is called once per iteration on this host's rows as
`fn(prompts=[...], completions=[...], completion_ids=[...], **columns)`: `prompts` are the
dataset's prompts as written (text, or lists of messages), `completions` the decoded samples
(text, or `[{"role": "assistant", "content": text}]` for conversational data), and every other
column of the dataset arrives as a keyword list aligned with them (e.g. a ground-truth `answer`).
It returns one float per row, or None where it does not apply. The trained reward is the
weighted sum, a None counting 0; each function's mean over the rows it applies to is logged as
`rewards/<name>` (the mean over all hosts' rows), and every scored row (prompt, completion, each
function's value) goes to `completions.jsonl` with its iteration.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rlhf_jax import distributed, paths, plugins
from rlhf_jax.data.tokenization import collate_prompts
from rlhf_jax.errors import ConfigError

COMPLETIONS = "completions.jsonl"  # every scored row of a dataset run, with its iteration
_ROW_FIELDS = ("prompt_ids", "tokens", "loss_mask", "completion_ids", "completion")


@dataclasses.dataclass(frozen=True)
class RewardFunctions:
    """Reward functions (TRL's signature), their weights and the names they are logged under."""

    fns: tuple[Callable[..., Sequence[float | None]], ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]

    def score(
        self, prompts: list, completions: list, completion_ids: list, columns: dict[str, list]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(weighted total [B] float32, each function's values [n_fns, B] with NaN for None).

        Raises:
          ValueError: a function that returns another number of values than rows, or a value
            that is not a number or None (naming the function).
        """
        n = len(completions)
        values = np.full((len(self.fns), n), np.nan, np.float64)
        for k, (fn, name) in enumerate(zip(self.fns, self.names)):
            out = list(fn(prompts=prompts, completions=completions,
                          completion_ids=completion_ids, **columns))  # fmt: skip
            if len(out) != n:
                raise ValueError(f"reward {name} returned {len(out)} values for {n} completions")
            for i, v in enumerate(out):
                if v is not None:
                    try:
                        values[k, i] = float(v)
                    except (TypeError, ValueError):
                        raise ValueError(
                            f"reward {name} returned {v!r} for row {i}: expected a number or None"
                        ) from None
        weighted = np.asarray(self.weights, np.float64)[:, None] * values
        total = np.where(np.isnan(values), 0.0, weighted).sum(0)
        return total.astype(np.float32), values


def _name(fn: Any, spec: Any) -> str:
    return spec.rpartition(":")[2] if isinstance(spec, str) else getattr(fn, "__name__", "reward")


def reward_functions(
    fns: Sequence[str | Callable[..., Any]],
    weights: Sequence[float] | None = None,
    *,
    flag: str = "--reward-fn",
) -> RewardFunctions:
    """Functions (callables or `module:function` / `path/file.py:function` specs) and weights
    (default 1 each); names are the functions' (repeated ones numbered).

    Raises:
      ValueError: no function, an unimportable spec, or another number of weights than functions
        (naming `flag` / --reward-weights).
    """
    if not fns:
        raise ValueError(f"{flag}: give at least one reward function")
    loaded = [plugins.load_callable(f, flag=flag) if isinstance(f, str) else f for f in fns]
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(loaded)
    if len(weights) != len(loaded):
        raise ValueError(
            f"--reward-weights: {len(weights)} weights for {len(loaded)} reward functions; give "
            "one per function"
        )
    names: list[str] = []
    for fn, spec in zip(loaded, fns):
        name = _name(fn, spec)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return RewardFunctions(tuple(loaded), tuple(float(w) for w in weights), tuple(names))


class RowReward:
    """The host reward of a dataset run (`make_host_reward_step(..., on="rows")`): samples are
    (dataset row index, completion ids without EOS, prompt ids); the score of each is the
    weighted sum of `rewards` on the row's prompt, the decoded completion and its other
    columns."""

    def __init__(
        self,
        rewards: RewardFunctions,
        rows: Sequence[dict[str, Any]],
        tokenizer: Any,
        *,
        conversational: bool,
        log_path: Any = None,
    ):
        self.rewards, self.rows, self.tokenizer = rewards, rows, tokenizer
        self.conversational, self.log_path = conversational, log_path
        self.columns = sorted({k for r in rows for k in r if k not in (*_ROW_FIELDS, "prompt")})
        self.values: np.ndarray | None = None  # the last call's [n_fns, B]
        self._rewound = False  # the log's rows of a killed run's lost iterations dropped

    def __call__(self, samples: Sequence[tuple], iteration: int = 0) -> np.ndarray:
        """Scores [B] of samples (dataset row index, completion ids[, the prompt ids sampled
        from: checked against the row's, so that no reward reads another row's columns])."""
        index = [s[0] for s in samples]
        ids = [list(s[1]) for s in samples]
        for s in samples:
            if len(s) > 2 and list(s[2]) != list(self.rows[s[0]]["prompt_ids"]):
                raise ValueError(
                    f"a completion sampled from other prompt tokens than dataset row {s[0]}'s: the "
                    "batch's row index and its prompt disagree"
                )
        texts = self.tokenizer.decode_batch(ids)
        completions = (
            [[{"role": "assistant", "content": t}] for t in texts] if self.conversational else texts
        )
        prompts = [self.rows[i]["prompt"] for i in index]
        columns = {c: [self.rows[i].get(c) for i in index] for c in self.columns}
        total, self.values = self.rewards.score(prompts, completions, ids, columns)
        return total

    def log(self, iteration: int, index: Sequence[int], ids: Sequence, values: Any, total: Any):
        """Appends scored rows to `log_path` (on the primary process; none without a path):
        their dataset row `index`, completion `ids` (decoded here), each function's `values`
        [functions, rows] (NaN: not applicable) and the weighted `total`. A multi-host step
        passes every host's rows (`stages.make_host_reward_step`). The first call of a resumed
        run first drops the rows of iterations >= `iteration` (those of a killed run's lost
        part), so every iteration is logged once."""
        if self.log_path is None or not distributed.is_primary():
            return
        texts = self.tokenizer.decode_batch([list(i) for i in ids])
        prompts = [self.rows[i]["prompt"] for i in index]
        self._log(iteration, index, prompts, texts, total, np.asarray(values))

    def _log(self, iteration: int, index, prompts, texts, total, table) -> None:
        lines = []
        for j, (i, p, t) in enumerate(zip(index, prompts, texts)):
            values = {
                n: (None if np.isnan(v) else float(v))
                for n, v in zip(self.rewards.names, table[:, j])
            }
            lines.append(json.dumps({
                "iteration": iteration, "index": i, "prompt": p, "completion": t,
                "rewards": values, "reward": float(total[j]),
            }))  # fmt: skip
        text = "\n".join(lines) + "\n"
        path = paths.as_path(self.log_path)
        if not self._rewound:  # a resumed run: the iterations from here on are logged anew
            self._rewound = True
            kept = _lines_before(path, iteration)
            if kept is not None:
                paths.write_text_atomic(path, kept)
        if "://" in str(self.log_path):  # an object store: no appends
            paths.write_text_atomic(path, (path.read_text() if path.exists() else "") + text)
        else:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(text)


def _lines_before(path: Any, iteration: int) -> str | None:
    """The lines of an existing log whose iteration is below `iteration` (up to a line cut by a
    kill), or None when there is no log or nothing to drop."""
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["iteration"] >= iteration:
                continue
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        kept.append(line)
    return None if len(kept) == len(lines) else "".join(x + "\n" for x in kept)


def from_flags(config: Any, *, learned: bool) -> RewardFunctions | None:
    """The reward functions of a driver's --reward-fn / --reward-weights, imported at the door
    (None when `learned`: a reward model scores instead).

    Raises:
      ConfigError: neither or both rewards given, an unimportable function, or another number
        of weights than functions.
    """
    if bool(config.reward_fn) == learned:
        raise ConfigError(
            "--dataset needs one reward: --reward-fn module:function [...] (Python rewards that "
            "see the dataset's columns) or --reward REWARD_MODEL_WORKDIR"
        )
    if learned:
        return None
    try:
        return reward_functions(config.reward_fn, config.reward_weights)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def host_reward(functions: RewardFunctions, rows: Sequence[dict], tokenizer: Any, workdir: Any):
    """The `host_reward` / `reward_on` arguments of a stage for `functions` on the dataset's
    encoded prompt `rows`, logging to WORKDIR/completions.jsonl."""
    reward = RowReward(
        functions, rows, tokenizer, conversational=isinstance(rows[0]["prompt"], list),
        log_path=paths.as_path(workdir) / COMPLETIONS,
    )  # fmt: skip
    return {"host_reward": reward, "reward_on": "rows"}


def prompt_rows_loader(
    rows: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    max_prompt_length: int,
    tokenizer: Any,
    seed: int,
) -> Any:
    """A resumable loader of a dataset's encoded prompt rows (`data.encode_dataset`), LEFT-padded
    to `max_prompt_length`, each batch with the rows' dataset `index` [B] (what `RowReward`
    reads)."""
    from rlhf_jax.data import loaders

    records = [{"prompt_ids": r["prompt_ids"], "index": i} for i, r in enumerate(rows)]

    def collate(batch: Sequence[dict]) -> dict[str, np.ndarray]:
        out = collate_prompts(batch, tokenizer, max_prompt_length=max_prompt_length, buckets=None)
        out["index"] = np.asarray([r["index"] for r in batch], np.int32)
        return out

    return loaders.make_loader(records, batch_size=batch_size, seed=seed, batch_fn=collate)
