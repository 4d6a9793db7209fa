"""rlhf_jax.data.tasks.task_loaders: demonstration, prompt and preference batches of fixed
shapes from a task's splits; preference batches need pairs. On the conftest's `word_tokenizer`."""

import pytest
from helpers.run_inputs import PAIRS

from rlhf_jax.data import tasks


def test_task_loaders_give_fixed_shapes(word_lm, word_tokenizer):
    class Task:
        train = [{"text": "the film was good"}, {"text": "a bad plot"}] * 4
        test = train
        train_prompts = ["the film", "a", "the plot was", "fine"] * 2
        test_prompts = train_prompts

    kw = dict(tokenizer=word_tokenizer, batch_size=4, max_length=10, max_prompt_length=3, seed=0)
    demo = next(tasks.task_loaders(Task, "demonstration", **kw))
    assert demo["tokens"].shape == (4, 10)
    rows = {tuple(t[m > 0]) for t, m in zip(demo["tokens"], demo["loss_mask"])}
    assert rows <= {
        tuple(word_tokenizer.encode(r["text"]) + [word_tokenizer.eos_id]) for r in Task.train
    }
    prompts = next(tasks.task_loaders(Task, "prompt", split="test", **kw))
    assert prompts["prompt_tokens"].shape == (4, 3)
    prefs = next(tasks.task_loaders(Task, "preference", records=PAIRS * 2, **kw))
    assert prefs["chosen_tokens"].shape == prefs["rejected_tokens"].shape == (4, 10)
    with pytest.raises(ValueError, match="make_preference_pairs"):
        tasks.task_loaders(Task, "preference", **kw)
