"""Reference log-probs (rlhf_jax.train.attach_reference, cached) and a reward model's pair
accuracy (rlhf_jax.eval.preference_accuracy) against the same computed one pair at a time from
the final hidden states. On the conftest's `word_lm` and `word_tokenizer`."""

import functools

import jax
import numpy as np
import pytest
from helpers.run_inputs import PAIRS, make_tokenizer

from rlhf_jax import data, models, train
from rlhf_jax import eval as ev


def _rows(lengths):
    """Every (pair, side) of PAIRS as (unpadded tokens, loss mask), tokenized one at a time."""
    out = []
    for r in PAIRS:
        row = data.tokenize_preference(make_tokenizer(), r.prompt, r.chosen, r.rejected, **lengths)
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


def test_preference_accuracy_and_attach_reference_match_one_pair_at_a_time(
    word_lm, word_tokenizer, tmp_path
):
    cfg, params = word_lm
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
    got = ev.preference_accuracy(rm, rm_params, PAIRS, word_tokenizer, batch_size=2, **lengths)
    assert got["accuracy"] == pytest.approx(np.mean(margins > 0))
    assert got["margin"] == pytest.approx(np.mean(margins), abs=1e-5)

    model = models.Transformer(cfg)
    cache = tmp_path / "ref.npz"
    collate = functools.partial(
        data.collate_preferences, tokenizer=word_tokenizer, buckets=None, **lengths
    )
    dicts = [data.record_to_dict(r) for r in PAIRS]
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
    for j, (r, rec) in enumerate(zip(PAIRS, recs)):
        assert (rec["prompt"], rec["chosen"], rec["rejected"]) == (r.prompt, r.chosen, r.rejected)
        assert rec["reference_chosen_logps"] == pytest.approx(logps[2 * j], rel=1e-5)
        assert rec["reference_rejected_logps"] == pytest.approx(logps[2 * j + 1], rel=1e-5)
    assert train.attach_reference(model, None, dicts, collate, cache_path=cache) == recs
