"""Evaluation: reward vs KL of a policy, win rates across temperatures, best-of-N, and the
held-out preference accuracy of a reward model.

    result = evaluate_reward_kl(Transformer(cfg), params, ref_params, prompt_batch, rng,
                                sampling=SamplingConfig(max_new_tokens=24),
                                eos_id=tok.eos_id, pad_id=tok.pad_id,
                                reward_fn=synthetic.ground_truth_reward, tokenizer=tok)
    result.kl_mean, result.reward_mean, result.reward_stderr, result.texts[:3]
"""

from rlhf_jax.eval.accuracy import preference_accuracy, preference_scores
from rlhf_jax.eval.best_of_n import BestOfN, best_of_n, best_of_n_kl, best_of_n_probs
from rlhf_jax.eval.common import (
    SequenceKL,
    TextReward,
    TokenReward,
    masked_sequence_sum,
    mean_and_stderr,
    reward_model_score_fn,
    sample_completions,
    sequence_kl,
)
from rlhf_jax.eval.reward_kl import RewardKL, WinRate, evaluate_reward_kl, win_rate, win_rate_sweep
from rlhf_jax.sampling import SamplingConfig

__all__ = [
    "BestOfN",
    "RewardKL",
    "SamplingConfig",
    "SequenceKL",
    "TextReward",
    "TokenReward",
    "WinRate",
    "best_of_n",
    "best_of_n_kl",
    "best_of_n_probs",
    "evaluate_reward_kl",
    "masked_sequence_sum",
    "mean_and_stderr",
    "preference_accuracy",
    "preference_scores",
    "reward_model_score_fn",
    "sample_completions",
    "sequence_kl",
    "win_rate",
    "win_rate_sweep",
]
