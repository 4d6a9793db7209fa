"""rlhf_jax.pairs.make_preference_pairs: sampled completions labelled into every pair of each
prompt as an independent labelling of the scored texts does, and a rerun read from the cache. On
the conftest's `word_lm` and `word_tokenizer`."""

import itertools

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax import pairs as pairs_lib
from rlhf_jax.sampling import SamplingConfig


def test_make_preference_pairs_labels_every_pair_and_caches(tmp_path, word_lm, word_tokenizer):
    cfg, params = word_lm
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
        models.Transformer(cfg), params, prompts, word_tokenizer, jax.random.PRNGKey(0),
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
        models.Transformer(cfg), params, prompts, word_tokenizer, jax.random.PRNGKey(0),
        cache_path=cache, **kwargs,
    )  # fmt: skip
    assert seen == [] and [(r.prompt, r.chosen, r.rejected) for r in again] == expected
