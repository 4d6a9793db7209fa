"""Preference pairs sampled from a policy and labelled by a reward, as the DPO paper builds its
IMDb pairs: k completions per prompt, every pair of them ranked by the reward.

    pairs = task_preference_pairs(task, model, sft_params, split="train", num_prompts=2000,
                                  seed=0, sampling=SamplingConfig(max_new_tokens=48),
                                  cache_path="runs/rm/pairs.jsonl")

One RNG convention for every stage (drivers and the frontier alike): the pairs of a split are
sampled with `pair_rng(seed, split)`, so stages run with the same seed and SFT model (the reward
model, DPO) see the same pairs.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import data as rdata
from rlhf_jax import distributed, paths
from rlhf_jax.eval import sample_completions
from rlhf_jax.sampling import SamplingConfig

logger = logging.getLogger("rlhf_jax.pairs")

SPLITS = ("train", "test")


def pair_rng(seed: int, split: str) -> jax.Array:
    """The sampling key of a split's pairs: `fold_in(PRNGKey(seed), SPLITS.index(split))`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return jax.random.fold_in(jax.random.PRNGKey(seed), SPLITS.index(split))


def make_preference_pairs(
    policy_model: Any,
    params: Any,
    prompts: Sequence[str],
    tokenizer: rdata.Tokenizer,
    rng: jax.Array,
    *,
    sampling: SamplingConfig,
    reward_fn: Callable[[list[str]], Any],
    completions_per_prompt: int = 4,
    max_prompt_length: int = 64,
    batch_size: int = 64,
    cache_path: str | os.PathLike | None = None,
) -> list[rdata.PreferenceRecord]:
    """Preference pairs labelled by a reward, as the DPO paper builds its IMDb pairs.

    k = `completions_per_prompt` completions are sampled per prompt from the policy
    (`eval.sample_completions`: one compiled program over chunks of `batch_size` rows, chunk i
    with key fold_in(rng, i)), each prompt + completion is scored with `reward_fn(texts)`, and all
    k(k-1)/2 pairs of a prompt are labelled: chosen = the higher reward. Exact ties (identical
    completions included) and pairs with an empty completion are dropped, and their number is
    logged. With `cache_path`, an existing file is read instead, and a fresh result is written
    there (JSONL, rewards in each record's metadata; on several hosts each samples all pairs, the
    same ones, and the primary writes the file).

    Args:
      policy_model: a `Transformer`; params: its params.
      prompts: N prompt strings.
      tokenizer: the task's tokenizer (EOS ends a completion).
      rng: sampling key (e.g. `pair_rng(seed, split)`).
      sampling: how completions are drawn (max_new_tokens, temperature, top_k, top_p).
      reward_fn: texts [M] -> rewards [M] (e.g. `synthetic.ground_truth_reward`).
      completions_per_prompt: k >= 2.
      max_prompt_length: prompts keep their last this many tokens (and are left-padded to the
        longest).
      batch_size: generation batch (rows = prompts x k).
      cache_path: JSONL cache (e.g. WORKDIR/pairs.jsonl).
    Returns:
      The PreferenceRecords, grouped by prompt in prompt order.
    """
    if cache_path is not None and paths.as_path(cache_path).is_file():
        return rdata.read_preference_jsonl(cache_path)
    k = completions_per_prompt
    if k < 2:
        raise ValueError(f"completions_per_prompt must be >= 2, got {k}")
    if not prompts:
        raise ValueError("make_preference_pairs needs at least one prompt")
    longest = max(len(ids) for ids in tokenizer.encode_batch(prompts))
    p_len = max(1, min(max_prompt_length, longest))  # left-padded to the longest prompt
    batch = rdata.tokenize_prompts(tokenizer, prompts, max_prompt_length=p_len)
    repeated = {
        name: np.repeat(batch[name], k, axis=0) for name in ("prompt_tokens", "prompt_mask")
    }
    out = sample_completions(
        policy_model,
        params,
        repeated,
        rng,
        sampling=sampling,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        batch_size=batch_size,
    )
    ids = [
        t[(m > 0) & (t != tokenizer.eos_id)].tolist() for t, m in zip(out["tokens"], out["mask"])
    ]
    completions = tokenizer.decode_batch(ids)
    texts = [prompts[i // k] + c for i, c in enumerate(completions)]
    rewards = np.asarray(reward_fn(texts), np.float32)  # [N*k]
    pairs, ties, empty = [], 0, 0
    for p, prompt in enumerate(prompts):
        for a, b in itertools.combinations(range(p * k, (p + 1) * k), 2):
            if not completions[a].strip() or not completions[b].strip():
                empty += 1
            elif rewards[a] == rewards[b]:
                ties += 1
            else:
                w, lo = (a, b) if rewards[a] > rewards[b] else (b, a)
                meta = {"chosen_reward": float(rewards[w]), "rejected_reward": float(rewards[lo])}
                pairs.append(rdata.PreferenceRecord(prompt, completions[w], completions[lo], meta))
    logger.info(
        "%d preference pairs from %d prompts x %d completions; dropped %d exact ties and %d "
        "pairs with an empty completion",
        len(pairs),
        len(prompts),
        k,
        ties,
        empty,
    )
    if cache_path is not None and distributed.is_primary():
        rdata.write_jsonl(cache_path, pairs)  # atomic, local or cloud (`paths`)
    return pairs


def task_preference_pairs(
    task: Any,
    policy_model: Any,
    params: Any,
    *,
    split: str = "train",
    num_prompts: int,
    first_prompt: int = 0,
    seed: int,
    sampling: SamplingConfig,
    completions_per_prompt: int = 4,
    max_prompt_length: int = 8,
    batch_size: int = 64,
    cache_path: str | os.PathLike | None = None,
) -> list[rdata.PreferenceRecord]:
    """`make_preference_pairs` on prompts `first_prompt .. first_prompt + num_prompts - 1` of the
    offline task's split, scored by the task's ground truth, with the key `pair_rng(seed, split)`.
    """
    prompts = task.train_prompts if split == "train" else task.test_prompts
    return make_preference_pairs(
        policy_model,
        params,
        list(prompts[first_prompt : first_prompt + num_prompts]),
        rdata.task_tokenizer(task),
        pair_rng(seed, split),
        sampling=sampling,
        reward_fn=task.reward_fn,
        completions_per_prompt=completions_per_prompt,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
        cache_path=cache_path,
    )
