"""Grain loaders: determinism, restore-from-state equality, host sharding, fixed-shape batches."""

import functools
import itertools
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers
from tokenizers import models, pre_tokenizers

from rlhf_jax.data import (
    Tokenizer,
    collate_preferences,
    loader_state,
    make_loader,
    prepare_dataset,
    read_preference_jsonl,
    restore_loader,
    write_jsonl,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
# grain's shuffle costs ~90/n ms per element (ms on a dozen elements, us on hundreds): keep n large.
N = 300
tfds.disable_progress_bar()


def take(it, n):
    return [np.asarray(b).tolist() for b in itertools.islice(it, n)]


def epoch_elements(n, *, seed, shard_index, shard_count, drop):
    """All elements one host sees in one epoch, in order (batch size 1)."""
    it = make_loader(
        list(range(n)),
        batch_size=1,
        seed=seed,
        num_epochs=1,
        shard_index=shard_index,
        shard_count=shard_count,
        drop_remainder_shards=drop,
    )
    return [b[0] for b in take(it, n + 1)]


def test_same_seed_same_batches_other_seed_other_order():
    kwargs = dict(batch_size=50, shard_index=0, shard_count=1)
    a = take(make_loader(list(range(N)), seed=7, **kwargs), 12)
    b = take(make_loader(list(range(N)), seed=7, **kwargs), 12)
    c = take(make_loader(list(range(N)), seed=8, **kwargs), 12)
    assert a == b
    assert a != c
    assert all(len(batch) == 50 for batch in a)
    # 300 elements / 50 = 6 batches per epoch: each epoch is a permutation, reshuffled per epoch.
    first, second = sum(a[:6], []), sum(a[6:], [])
    assert sorted(first) == sorted(second) == list(range(N))
    assert first != second and first != list(range(N))


def test_no_shuffle_keeps_order_and_finite_epochs_end():
    it = make_loader(
        list(range(7)),
        batch_size=3,
        seed=0,
        shuffle=False,
        num_epochs=2,
        shard_index=0,
        shard_count=1,
    )
    # 14 elements in 3s: the incomplete last batch is dropped so every batch has a fixed shape.
    assert take(it, 10) == [[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 3, 4]]


@pytest.mark.parametrize("interrupt_at", [1, 4, 7])
def test_restore_from_state_sees_the_same_batches(interrupt_at):
    def loader():
        return make_loader(list(range(N)), batch_size=40, seed=11, shard_index=1, shard_count=2)

    uninterrupted = take(loader(), 9)
    first = loader()
    seen = take(first, interrupt_at)
    state = json.loads(json.dumps(loader_state(first)))  # survives a round trip to disk
    resumed = restore_loader(loader(), state)
    assert seen + take(resumed, 9 - interrupt_at) == uninterrupted


def test_restore_with_collate_transform():
    records = read_preference_jsonl(os.path.join(FIXTURES, "preferences.jsonl")) * 100
    batch_fn = functools.partial(
        collate_preferences,
        tokenizer=_tokenizer(),
        max_length=16,
        max_prompt_length=8,
        buckets=None,
    )

    def loader():
        return make_loader(records, batch_size=2, seed=5, batch_fn=batch_fn)

    uninterrupted = list(itertools.islice(loader(), 6))
    first = loader()
    next(first), next(first)
    resumed = restore_loader(loader(), loader_state(first))
    for want, got in zip(uninterrupted[2:], itertools.islice(resumed, 4)):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
            assert got[key].shape == (2, 16) and got[key].dtype == np.int32


@pytest.mark.parametrize("shard_count", [2, 4])
@pytest.mark.parametrize("n", [256, 257])
def test_host_shards_are_disjoint_and_complete(n, shard_count):
    for drop in (True, False):
        shards = [
            epoch_elements(n, seed=3, shard_index=i, shard_count=shard_count, drop=drop)
            for i in range(shard_count)
        ]
        flat = sum(shards, [])
        assert len(flat) == len(set(flat))  # disjoint
        if drop:
            assert {len(s) for s in shards} == {n // shard_count}  # equal steps on every host
            assert len(flat) == n - n % shard_count
        else:
            assert sorted(flat) == list(range(n))  # complete
    # With n divisible by the host count, the hosts interleave the single-host order exactly,
    # so host batches stacked together are the batch of one host with the global batch size.
    if n % shard_count == 0:
        single = epoch_elements(n, seed=3, shard_index=0, shard_count=1, drop=True)
        for i in range(shard_count):
            shard = epoch_elements(n, seed=3, shard_index=i, shard_count=shard_count, drop=True)
            assert shard == single[i::shard_count]


@pytest.mark.parametrize("shard_count", [2, 4])
def test_host_batches_stacked_are_the_single_host_global_batch(shard_count):
    """Host i's batch j is rows [i*b, (i+1)*b) of the batch j one host loads with b*k rows, in
    order (what `sharding.shard_batch` assembles): a multi-host run sees the same global batches,
    row for row, as one host, across epoch boundaries too (6 batches of 40 > 1 epoch of 100)."""
    b, steps = 5, 6
    single = take(make_loader(list(range(100)), batch_size=b * shard_count, seed=4,
                              shard_index=0, shard_count=1), steps)  # fmt: skip
    hosts = [
        take(
            make_loader(
                list(range(100)), batch_size=b, seed=4, shard_index=i, shard_count=shard_count
            ),
            steps,
        )  # fmt: skip
        for i in range(shard_count)
    ]
    for j in range(steps):
        assert sum((h[j] for h in hosts), []) == single[j]


def test_default_shard_is_this_jax_process():
    a = take(make_loader(list(range(N)), batch_size=2, seed=1), 6)
    b = take(make_loader(list(range(N)), batch_size=2, seed=1, shard_index=0, shard_count=1), 6)
    assert a == b


def test_loader_over_tfds_data_source(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_jsonl(
        manual / "train.jsonl",
        read_preference_jsonl(os.path.join(FIXTURES, "preferences.jsonl")) * 100,
    )
    prepare_dataset("local_preferences", tmp_path / "tfds", manual_dir=manual)
    source = tfds.data_source("local_preferences", split="train", data_dir=str(tmp_path / "tfds"))
    batch_fn = functools.partial(
        collate_preferences,
        tokenizer=_tokenizer(),
        max_length=16,
        max_prompt_length=8,
        buckets=(8,),
    )
    it = make_loader(source, batch_size=2, seed=0, batch_fn=batch_fn, shard_index=0, shard_count=1)
    batches = list(itertools.islice(it, 4))
    assert all(b["chosen_tokens"].shape == b["rejected_tokens"].shape for b in batches)
    assert {b["chosen_tokens"].shape[1] for b in batches} <= {8, 16}
    state = loader_state(it)
    again = make_loader(
        source, batch_size=2, seed=0, batch_fn=batch_fn, shard_index=0, shard_count=1
    )
    assert [b["chosen_tokens"].tolist() for b in itertools.islice(again, 4)] == [
        b["chosen_tokens"].tolist() for b in batches
    ]
    np.testing.assert_array_equal(
        next(restore_loader(again, state))["chosen_tokens"], next(it)["chosen_tokens"]
    )


def test_argument_checks():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_loader(list(range(5)), batch_size=3, seed=0, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        make_loader(list(range(5)), batch_size=1, seed=0, shard_index=2, shard_count=2)


def _tokenizer() -> Tokenizer:
    """A whitespace word-level tokenizer over the words of the preference fixture."""
    records = read_preference_jsonl(os.path.join(FIXTURES, "preferences.jsonl"))
    words = sorted(
        {w for r in records for t in (r.prompt, r.chosen, r.rejected) for w in t.split()}
    )
    vocab = {w: i for i, w in enumerate(["<pad>", "<|endoftext|>", "[UNK]", *words])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<|endoftext|>"])
    return Tokenizer(backend)
