"""KTO's batches (`data.collate_unpaired`): each row is prompt + completion (+ EOS when it fits)
with the loss on the completion, and its mismatched pair is the next row's prompt with this
row's completion (TRL's KL dataset: completions shifted by one within the batch); preference
records split into a desirable and an undesirable row (TRL's `unpair_preference_dataset`)."""

import numpy as np
import pytest

from rlhf_jax import data


class Words:
    """A word-level tokenizer: ids are word positions in a fixed list + 3 (0 pad, 1 EOS)."""

    words = "the film was good bad a plot great dull".split()
    pad_id, eos_id = 0, 1

    def encode(self, text):
        return [self.words.index(w) + 3 for w in text.split()]


TOK = Words()


def _ids(text):
    return TOK.encode(text)


def test_rows_and_their_mismatched_pairs_from_text():
    records = [
        {"prompt": "the film", "completion": "was good", "label": True},
        {"prompt": "a plot", "completion": "dull", "label": False},
        {"prompt": "the", "completion": "plot was great", "label": True},
    ]
    batch = data.collate_unpaired(records, TOK, max_length=7, max_prompt_length=3)
    np.testing.assert_array_equal(batch["desirable"], [1, 0, 1])
    n = len(records)
    for i, r in enumerate(records):
        own = _ids(r["prompt"]) + _ids(r["completion"]) + [1]
        other = _ids(records[(i + 1) % n]["prompt"]) + _ids(r["completion"]) + [1]
        for prefix, row, prompt in (("", own, r["prompt"]), ("kl_", other, None)):
            p = len(_ids(prompt if prompt is not None else records[(i + 1) % n]["prompt"]))
            want = row + [0] * (7 - len(row))
            np.testing.assert_array_equal(batch[f"{prefix}tokens"][i], want)
            np.testing.assert_array_equal(
                batch[f"{prefix}attention_mask"][i], [1] * len(row) + [0] * (7 - len(row))
            )
            mask = [0] * p + [1] * (len(row) - p) + [0] * (7 - len(row))
            np.testing.assert_array_equal(batch[f"{prefix}loss_mask"][i], mask)


def test_encoded_rows_keep_their_ids_and_long_pairs_are_cut():
    rows = [
        {"prompt_ids": [3, 4, 5], "completion_ids": [6, 1], "label": True},
        {"prompt_ids": [7], "completion_ids": [8, 9, 10, 1], "label": False},
    ]
    batch = data.collate_unpaired(rows, TOK, max_length=6, max_prompt_length=3)
    np.testing.assert_array_equal(batch["tokens"][0], [3, 4, 5, 6, 1, 0])
    np.testing.assert_array_equal(batch["tokens"][1], [7, 8, 9, 10, 1, 0])
    # Row 1's completion after row 0's 3-token prompt is 8 tokens: cut to the 6 that fit.
    np.testing.assert_array_equal(batch["kl_tokens"][1], [3, 4, 5, 8, 9, 10])
    np.testing.assert_array_equal(batch["kl_loss_mask"][1], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(batch["kl_tokens"][0], [7, 6, 1, 0, 0, 0])


def test_preference_records_split_and_bad_inputs():
    pairs = [data.PreferenceRecord("the film", "was good", "was bad")]
    rows = data.as_unpaired(pairs)
    assert rows == [
        {"prompt": "the film", "completion": "was good", "label": True},
        {"prompt": "the film", "completion": "was bad", "label": False},
    ]
    encoded = [{"prompt_ids": [3], "chosen_ids": [4, 1], "rejected_ids": [5, 1]}]
    assert [r["label"] for r in data.as_unpaired(encoded)] == [True, False]
    labelled = [{"prompt": "a", "completion": "plot", "label": False}]
    assert data.as_unpaired(labelled) == labelled
    with pytest.raises(ValueError, match="neither, or a mix"):
        data.as_unpaired(labelled + [{"prompt": "a", "chosen": "good", "rejected": "bad"}])
    with pytest.raises(ValueError, match="at least 2 rows"):
        data.collate_unpaired(labelled, TOK, max_length=4, max_prompt_length=2)
