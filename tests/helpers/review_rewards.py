"""A Python reward for the multi-host driver test (`grpo.py --dataset --reward-fn`): it reads a
dataset column (`word`) and varies between completions, so the groups have a signal."""


def mentions(prompts, completions, word, **columns):
    """1 when the completion mentions the row's `word`, plus its length in characters / 100."""
    return [float(w in c) + len(c) / 100 for c, w in zip(completions, word)]
