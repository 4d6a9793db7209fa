"""Curated one-line mutations of the steps, losses, sampler and checkpoint path: does some test
catch each of them?

    .venv/bin/python dev/mutants.py                 # every mutant, two at a time (~10 min)
    .venv/bin/python dev/mutants.py --list          # the table, nothing run
    .venv/bin/python dev/mutants.py --only dpo-stop-grad-chosen ppo-stale-ratio --jobs 1

Each mutant replaces one line of the library (an exact, unique substring of one file) in a
temporary copy of the working tree (tracked and untracked-but-not-ignored files; the prepared
`data/` is linked, not copied) and runs only its related test files there (`pytest -x`).
"caught" means a test failed, "SURVIVED" that they all passed. First, the test files of the
selected mutants run once together on the unmutated copy (skip with --no-baseline): a red
baseline makes every "caught" meaningless. Exit status 1 if any mutant survived that is not in
`ACCEPTED_SURVIVORS`, or the baseline failed.

A tool to run before closing an issue that touches a step, loss, the sampler or the checkpoint
path: not part of `make test`. Add a mutant for each bug a test was written to catch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """`old` (exactly once in `path`) becomes `new`; `tests` are pytest arguments."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


STEP_TESTS = ("tests/test_step_gradients.py",)
PPO_TESTS = ("tests/test_train_ppo_update.py", "tests/test_train_ppo.py")
CRITIC_FREE_TESTS = ("tests/test_losses_critic_free.py",)
FAMILY_TESTS = (
    "tests/test_families.py::test_logits_match_transformers",
    "tests/test_families.py::test_greedy_decoding_matches_transformers_generate",
)

MUTANTS = (
    # --- the training steps -------------------------------------------------------------------
    Mutant(
        "dpo-stop-grad-chosen",
        "rlhf_jax/train/dpo.py",
        "pc, pr, tlp = pair_logps(model, params, batch, average=average)  # [B], [B]",
        "pc, pr, tlp = pair_logps(model, params, batch, average=average); "
        "pc = jax.lax.stop_gradient(pc)",
        (*STEP_TESTS, "tests/test_train_dpo.py"),
        "half of DPO's gradient (the chosen side) disappears",
    ),
    Mutant(
        "dpo-reference-swapped",
        "rlhf_jax/train/dpo.py",
        "rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)",
        "rc, rr = jax.lax.stop_gradient(rr), jax.lax.stop_gradient(rc)",
        (*STEP_TESTS, "tests/test_train_dpo.py"),
        "reference log-probs of chosen and rejected swapped",
    ),
    Mutant(
        "simpo-gamma-ignored",
        "rlhf_jax/train/dpo.py",
        'g = hparams["gamma"] if "gamma" in hparams else gamma',
        "g = gamma",
        (*STEP_TESTS, "tests/test_train_dpo.py"),
        "SimPO's margin from the state is ignored",
    ),
    Mutant(
        "orpo-nll-on-rejected",
        "rlhf_jax/train/dpo.py",
        "nll = -jnp.sum(jnp.where(mask > 0, tlp[:b], 0.0)) / jnp.maximum(mask.sum(), 1.0)",
        "nll = -jnp.sum(jnp.where(mask > 0, tlp[b:], 0.0)) / jnp.maximum(mask.sum(), 1.0)",
        (*STEP_TESTS, "tests/test_train_dpo.py"),
        "ORPO's NLL term on the rejected responses",
    ),
    Mutant(
        "sft-mask-unshifted",
        "rlhf_jax/train/sft.py",
        'mask = batch["loss_mask"][:, 1:].astype(jnp.float32)  # [B, T-1]',
        'mask = batch["loss_mask"][:, :-1].astype(jnp.float32)  # [B, T-1]',
        (*STEP_TESTS, "tests/test_train_sft.py"),
        "the loss mask is not shifted with the targets",
    ),
    Mutant(
        "reward-margin-sign",
        "rlhf_jax/train/reward.py",
        'm = m + jnp.asarray(batch["margin"], jnp.float32)  # [B]',
        'm = m - jnp.asarray(batch["margin"], jnp.float32)  # [B]',
        (*STEP_TESTS, "tests/test_train_reward.py"),
        "the per-pair margin enters with the wrong sign",
    ),
    Mutant(
        "unlikelihood-alpha-ignored",
        "rlhf_jax/train/unlikelihood.py",
        'tlp[:b], mask[:b], tlp[b:], mask[b:], alpha=hparams["alpha"]',
        "tlp[:b], mask[:b], tlp[b:], mask[b:], alpha=1.0",
        STEP_TESTS,
        "Unlikelihood's alpha (0: Preferred-FT) from the state is ignored",
    ),
    Mutant(
        "grad-norm-of-updates",
        "rlhf_jax/train/state.py",
        'norms = {"grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates)}',
        'norms = {"grad_norm": optax.tree.norm(updates), "update_norm": optax.tree.norm(updates)}',
        ("tests/test_train_sft.py",),
        "grad_norm reports the update's norm",
    ),
    Mutant(
        "pairwise-function-ignored",
        "rlhf_jax/losses/dpo.py",
        "        fn = loss\n",
        '        fn = PAIRWISE_LOSSES["sigmoid"]\n',
        ("tests/test_train_step.py", "tests/test_bandit.py"),
        "a user's pairwise loss function is replaced by the built-in sigmoid",
    ),
    Mutant(
        "hparams-unchecked",
        "rlhf_jax/train/state.py",
        "    check_hparams(hparams or {})\n",
        "\n",
        ("tests/test_train_step.py",),
        "create_train_state accepts beta <= 0 (a traced value, unchecked later)",
    ),
    Mutant(
        "make-step-drops-frozen",
        "rlhf_jax/train/step.py",
        "loss, metrics = loss_fn(params, batch, frozen=frozen, hparams=hparams, **extra)",
        "loss, metrics = loss_fn(params, batch, frozen=None, hparams=hparams, **extra)",
        (*STEP_TESTS, "tests/test_train_step.py"),
        "the step contract does not pass the frozen (reference) params to the loss",
    ),
    Mutant(
        "prepare-init-skips-memory-flags",
        "rlhf_jax/run/cli.py",
        "    model_config = memory_config(config, model_config)\n",
        "    model_config = model_config\n",
        ("tests/test_run_start.py",),
        "the drivers parse --remat / --logits-chunk / --scan-layers but the model never gets them",
    ),
    Mutant(
        "logps-targets-off-by-one",
        "rlhf_jax/train/logps.py",
        "return slice(start, start + length), tokens[:, start + 1 : start + 1 + length]",
        "return slice(start, start + length), tokens[:, start : start + length]",
        (*STEP_TESTS, "tests/test_train_sft.py"),
        "every step's log-probs score the token at the position, not the next one",
    ),
    Mutant(
        "validate-skips-ranges",
        "rlhf_jax/run/checks.py",
        "        if rule is None or not (numeric or name in (rules or {})):\n",
        "        if True:\n",
        ("tests/test_drivers.py", "-k", "bad_input"),
        "the drivers' range checks are skipped (a bad --beta trains)",
    ),
    # --- PPO ----------------------------------------------------------------------------------
    Mutant(
        "ppo-stale-ratio",
        "rlhf_jax/train/ppo_update.py",
        'logps, mb["logps"], mb["advantages"], r_mask, clip_eps=cfg.clip_eps',
        'logps, jax.lax.stop_gradient(logps), mb["advantages"], r_mask, clip_eps=cfg.clip_eps',
        PPO_TESTS,
        "the update's 'old' log-probs are its current ones: ratio 1, never clipped",
    ),
    Mutant(
        "ppo-temperature-ignored",
        "rlhf_jax/train/logps.py",
        "logits = logits / temperature\n",
        "logits = logits\n",
        PPO_TESTS,
        "teacher-forced log-probs (the PPO loss's) ignore the sampling temperature",
    ),
    Mutant(
        "rollout-temperature-ignored",
        "rlhf_jax/train/logps.py",
        "logits, ref_logits = logits / temperature, ref_logits / temperature  # [B, n, V]",
        "logits, ref_logits = logits, ref_logits  # [B, n, V]",
        PPO_TESTS,
        "the rollout's log-probs and exact KL ignore the sampling temperature",
    ),
    Mutant(
        "ppo-vf-coef-ignored",
        "rlhf_jax/train/ppo_update.py",
        "loss = pg_loss + cfg.vf_coef * vf_loss",
        "loss = pg_loss + vf_loss",
        PPO_TESTS,
        "vf_coef is ignored",
    ),
    Mutant(
        "ppo-value-with-policy-optimizer",
        "rlhf_jax/train/step.py",
        "ub, sb = second.update(grads[1], state[1], pb)",
        "ub, sb = first.update(grads[1], state[1], pb)",
        PPO_TESTS,
        "the critic is stepped by the policy's optimizer",
    ),
    Mutant(
        "ppo-reference-is-policy",
        "rlhf_jax/train/ppo.py",
        "ref = reference_view(policy_model, state.ref_params)",
        "ref = policy",
        PPO_TESTS,
        "the rollout's reference log-probs come from the policy (KL always 0)",
    ),
    # --- losses -------------------------------------------------------------------------------
    Mutant(
        "bandit-ppo-clip-broken",
        "rlhf_jax/losses/ppo.py",
        "clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)",
        "clipped = -adv * jnp.clip(ratio, 1.0 + clip_eps, 1.0 + clip_eps)",
        ("tests/test_bandit.py",),
        "clip range [1+eps, 1+eps]; only the bandit's convergence tests run",
    ),
    Mutant(
        "bandit-ppo-clip-removed",
        "rlhf_jax/losses/ppo.py",
        "clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)",
        "clipped = -adv * ratio",
        ("tests/test_bandit.py",),
        "PPO without its clip; only the bandit's convergence tests run",
    ),
    Mutant(
        "bandit-kl-sign",
        "rlhf_jax/bandit/training.py",
        'total = rewards - beta * kl_estimate(logps, ref_logps, estimator="k1")  # [X, M]',
        'total = rewards + beta * kl_estimate(logps, ref_logps, estimator="k1")  # [X, M]',
        ("tests/test_bandit.py",),
        "REINFORCE / PPO on r + beta KL",
    ),
    Mutant(
        "bandit-exact-pg-kl-sign",
        "rlhf_jax/bandit/training.py",
        "penalized = bandit.rewards - beta * (logps - ref_logps)  # [X, K]",
        "penalized = bandit.rewards + beta * (logps - ref_logps)  # [X, K]",
        ("tests/test_bandit.py",),
        "the exact gradient of r + beta KL",
    ),
    Mutant(
        "cdpo-smoothing-sign",
        "rlhf_jax/losses/dpo.py",
        "losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)",
        "losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)",
        (*STEP_TESTS, "tests/test_train_dpo.py"),
        "cDPO's label-smoothing term with the wrong sign (the library's own loss tests excluded)",
    ),
    Mutant(
        "gae-lambda-dropped",
        "rlhf_jax/losses/ppo.py",
        "adv = jnp.where(m_t, delta + gamma * lam * next_adv, 0.0)  # [B]",
        "adv = jnp.where(m_t, delta + gamma * next_adv, 0.0)  # [B]",
        ("tests/test_train_ppo.py",),
        "GAE without lambda (only the PPO step tests run)",
    ),
    Mutant(
        "whiten-biased-variance",
        "rlhf_jax/losses/ppo.py",
        "var = masked_sum(jnp.square(x - mean), m) / jnp.maximum(n - 1.0, 1.0)  # unbiased",
        "var = masked_sum(jnp.square(x - mean), m) / jnp.maximum(n, 1.0)  # unbiased",
        ("tests/test_losses_ppo.py", "tests/test_train_ppo.py"),
        "whitening with the biased variance",
    ),
    Mutant(
        "kl-reward-score-everywhere",
        "rlhf_jax/losses/kl.py",
        "return rewards + jnp.where(last, f32(scores)[:, None], 0.0)",
        "return rewards + jnp.where(m, _f32(scores)[:, None], 0.0)",
        ("tests/test_losses_kl.py", "tests/test_train_ppo.py"),
        "the sequence score is added at every response token, not the last",
    ),
    # --- sampler and KV cache -----------------------------------------------------------------
    Mutant(
        "host-reward-drops-prompt",
        "rlhf_jax/stages/ppo.py",
        "rows = train.response_token_lists(mine, include_query=include_prompt, drop_id=drop)",
        "rows = train.response_token_lists(mine, include_query=False, drop_id=drop)",
        ("tests/test_train_ppo.py",),
        "a host reward sees the completions without their prompts",
    ),
    Mutant(
        "sampler-temperature-ignored",
        "rlhf_jax/sampling.py",
        "scaled = logits / jnp.where(greedy, 1.0, t)  # [B, V]",
        "scaled = logits  # [B, V]",
        ("tests/test_sampling.py", "tests/test_train_ppo_update.py"),
        "the sampler draws at temperature 1 whatever it is told",
    ),
    Mutant(
        "sampler-untempered-logps",
        "rlhf_jax/sampling.py",
        "return token, picked(scaled, token) - log_norm",
        "return token, picked(logits, token) - jax.nn.logsumexp(logits, axis=-1)",
        ("tests/test_sampling.py", "tests/test_train_ppo_update.py"),
        "the sampler reports log-probs of the untempered distribution",
    ),
    Mutant(
        "kv-cache-positions",
        "rlhf_jax/models/transformer.py",
        "positions=cache.positions + new_ok.sum(axis=1, dtype=jnp.int32),",
        "positions=cache.positions + t,",
        ("tests/test_models.py", "tests/test_sampling.py"),
        "decode positions count pad slots (left-padded prompts drift)",
    ),
    # --- critic-free losses and methods -------------------------------------------------------
    Mutant(
        "grpo-std-biased",
        "rlhf_jax/losses/critic_free.py",
        "adv = adv / (jnp.std(r, axis=-1, keepdims=True, ddof=1) + eps)",
        "adv = adv / (jnp.std(r, axis=-1, keepdims=True) + eps)",
        CRITIC_FREE_TESTS,
        "GRPO's group std with ddof 0 instead of TRL's unbiased one",
    ),
    Mutant(
        "rloo-divides-by-g",
        "rlhf_jax/losses/critic_free.py",
        "adv = jnp.sum(r[..., :, None] - r[..., None, :], axis=-1) / (g - 1)",
        "adv = jnp.sum(r[..., :, None] - r[..., None, :], axis=-1) / g",
        CRITIC_FREE_TESTS,
        "RLOO's leave-one-out mean over G instead of G - 1",
    ),
    Mutant(
        "dapo-clip-higher-ignored",
        "rlhf_jax/losses/critic_free.py",
        "high = low if clip_eps_high is None else jnp.asarray(clip_eps_high, jnp.float32)",
        "high = low",
        CRITIC_FREE_TESTS,
        "DAPO's clip-higher bound replaced by the lower one",
    ),
    Mutant(
        "gspo-ratio-not-length-normalised",
        "rlhf_jax/losses/critic_free.py",
        "seq_log_ratio = masked_sum(log_ratio, m, axis=-1) / jnp.maximum(mask_count(m, -1), 1.0)",
        "seq_log_ratio = masked_sum(log_ratio, m, axis=-1)",
        CRITIC_FREE_TESTS,
        "GSPO's sequence ratio without the 1/|y| power",
    ),
    Mutant(
        "dr-grpo-norm-by-count",
        "rlhf_jax/losses/critic_free.py",
        "return masked_sum(x, m) / (rows * (t if max_tokens is None else max_tokens))",
        "return _masked_mean(x, m)",
        CRITIC_FREE_TESTS,
        "Dr. GRPO's constant normaliser replaced by the token count",
    ),
    Mutant(
        "bandit-kl-in-reward-dropped",
        "rlhf_jax/bandit/training.py",
        'kl_coef = beta if kl_in == "reward" else 0.0',
        "kl_coef = 0.0",
        ("tests/test_bandit.py",),
        "the critic-free methods' KL-in-the-reward term is lost",
    ),
    Mutant(
        "bandit-k3-as-k1",
        "rlhf_jax/bandit/training.py",
        'kl = dict(ref_logps=ref, kl_coef=beta, kl_estimator="k3")',
        'kl = dict(ref_logps=ref, kl_coef=beta, kl_estimator="k1")',
        ("tests/test_bandit.py",),
        "GRPO's k3 KL-in-the-loss computed with k1",
    ),
    Mutant(
        "groups-share-one-row",
        "rlhf_jax/sampling.py",
        "lambda x: x if x.ndim == 0 else jnp.repeat(x, groups, axis=0), (logits, cache)",
        "lambda x: x if x.ndim == 0 else jnp.tile(x, (groups,) + (1,) * (x.ndim - 1)), "
        "(logits, cache)",
        ("tests/test_sampling.py",),
        "group sampling copies the caches in the wrong row order",
    ),
    # --- model families -----------------------------------------------------------------------
    Mutant(
        "decode-window-ignored",
        "rlhf_jax/models/transformer.py",
        "m = key_mask[:, None, None, :] & (slots <= query) & _within(w, query, slots)",
        "m = key_mask[:, None, None, :] & (slots <= query)",
        FAMILY_TESTS,
        "the KV-cache decode path attends past the sliding window",
    ),
    Mutant(
        "rope-scaling-ignored",
        "rlhf_jax/models/layers.py",
        'if table == "local" or cfg.rope_type == "default":',
        "if True:",
        FAMILY_TESTS,
        "llama3 / linear RoPE scaling dropped",
    ),
    Mutant(
        "gemma-norm-offset-ignored",
        "rlhf_jax/models/layers.py",
        "return (y * ((1.0 + scale) if self.offset else scale)).astype(self.dtype)",
        "return (y * scale).astype(self.dtype)",
        FAMILY_TESTS,
        "Gemma's (1 + w) RMSNorm read as w",
    ),
    Mutant(
        "attn-softcap-ignored",
        "rlhf_jax/models/attention.py",
        "scores = softcapped(scores * jnp.float32(scale), softcap)  # [B, K, G, T, S]",
        "scores = scores * jnp.float32(scale)  # [B, K, G, T, S]",
        FAMILY_TESTS,
        "Gemma 2's attention soft-cap dropped in full passes",
    ),
    Mutant(
        "gqa-groups-interleaved",
        "rlhf_jax/models/attention.py",
        "q32 = q32.reshape(b, kh, h // kh, 1, dh)",
        "q32 = q32.reshape(b, h // kh, kh, 1, dh).swapaxes(1, 2)",
        FAMILY_TESTS,
        "decode maps query heads to the wrong kv head (GQA)",
    ),
    Mutant(
        "neox-serial-residual",
        "rlhf_jax/models/transformer.py",
        'return x + y + MLP(cfg, name="mlp")(norm(cfg, "mlp_norm")(x_in)), kv',
        'return x + y + MLP(cfg, name="mlp")(norm(cfg, "mlp_norm")(x + y)), kv',
        FAMILY_TESTS,
        "GPT-NeoX's parallel residual computed serially",
    ),
    Mutant(
        "neox-qkv-split",
        "rlhf_jax/models/hf_map.py",
        "return [a[:, j].transpose(2, 0, 1) for j in range(3)]",
        "return [a[:, 2 - j].transpose(2, 0, 1) for j in range(3)]",
        FAMILY_TESTS,
        "GPT-NeoX's fused query_key_value split in the wrong order",
    ),
    # --- checkpoints --------------------------------------------------------------------------
    Mutant(
        "checkpoint-restores-oldest",
        "rlhf_jax/checkpoint.py",
        "step = self._manager.latest_step()\n        if step is None:\n            return None",
        "step = min(self._manager.all_steps(), default=None)\n        if step is None:\n"
        "            return None",
        ("tests/test_checkpoint.py",),
        "resume from the oldest kept checkpoint instead of the latest",
    ),
    # --- LoRA and QLoRA -------------------------------------------------------------------------
    Mutant(
        "lora-scale-ignored",
        "rlhf_jax/models/projection.py",
        "return y + jnp.asarray(scale, y.dtype) * delta",
        "return y + delta",
        ("tests/test_lora_adapters.py",),
        "the adapters' alpha / r scale is dropped",
    ),
    Mutant(
        "lora-reference-with-adapters",
        "rlhf_jax/lora/adapters.py",
        'ref = frozen.get("ref", {"base": base})',
        'ref = frozen.get("ref", {"base": base, "lora": params})',
        ("tests/test_lora_adapters.py",),
        "the reference keeps the adapters on (the policy against itself)",
    ),
    Mutant(
        "nf4-nibbles-swapped",
        "rlhf_jax/models/quant.py",
        "idx = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)  # [n]",
        "idx = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)  # [n]",
        ("tests/test_qlora.py",),
        "NF4 codes unpacked in the wrong order",
    ),
    Mutant(
        "peft-b-untransposed",
        "rlhf_jax/lora/peft.py",
        'b = parts[0]["b"].reshape(r, -1).T  # [out, r]',
        'b = parts[0]["b"].reshape(-1, r)  # [out, r]',
        ("tests/test_lora_peft.py",),
        "PEFT's lora_B written as a reshape instead of a transpose",
    ),
    Mutant(
        "ppo-lora-critic-on-the-policy-base",
        "rlhf_jax/train/ppo.py",
        'trunk = ref_params if reward_params is None else reward_params["transformer"]',
        "trunk = ref_params",
        ("tests/test_lora_rl.py",),
        "PPO's LoRA critic reads the policy's base instead of the reward model's trunk",
    ),
    Mutant(
        "lora-dropout-key-dropped",
        "rlhf_jax/lora/adapters.py",
        "return loss_fn(view(params, base, rng), batch, frozen=ref, hparams=hparams)",
        "return loss_fn(view(params, base), batch, frozen=ref, hparams=hparams)",
        ("tests/test_lora_rl.py",),
        "the step's dropout key never reaches the adapters (dropout silently off)",
    ),
    # --- memory features (issue 14) -------------------------------------------------------------
    Mutant(
        "microbatch-gradients-summed",
        "rlhf_jax/train/step.py",
        "grads = jax.tree.map(lambda t, p: (t / k).astype(jnp.result_type(p)), total, params)",
        "grads = jax.tree.map(lambda t, p: t.astype(jnp.result_type(p)), total, params)",
        ("tests/test_planner.py::test_microbatches_lower_the_temporaries_and_keep_the_update",),
        "gradient accumulation sums the microbatches' gradients instead of averaging them",
    ),
    Mutant(
        "chunked-logps-without-temperature",
        "rlhf_jax/losses/logprobs.py",
        "    return logits / temperature\n",
        "    return logits\n",
        ("tests/test_planner.py::test_chunked_logps_equal_numpy_and_hold_no_full_logits",),
        "chunked log-probs ignore the sampling temperature",
    ),
    Mutant(
        "activations-unpinned",
        "rlhf_jax/sharding.py",
        '    if mesh.empty or getattr(x, "ndim", 0) < len(dims):\n',
        "    if True:\n",
        ("tests/test_planner.py::test_the_fused_rl_iteration_keeps_each_devices_rows",),
        "the activations are not pinned to the batch split: an RL iteration computes every row "
        "on every device",
    ),
    Mutant(
        "output-layer-not-vocab-parallel",
        "rlhf_jax/sharding.py",
        "        raise ValueError(f\"kind must be 'weight' or 'logits', got {kind!r}\")\n"
        "    return jax.lax.with_sharding_constraint(x, P(*_pinned(x, dims, mesh)))\n",
        "        raise ValueError(f\"kind must be 'weight' or 'logits', got {kind!r}\")\n"
        "    return x\n",
        (
            "tests/test_planner.py::test_chunked_log_probs_never_put_the_whole_output_layer_on_one_device",
        ),
        "the output layer is not split over the vocabulary in a log-prob chunk: every device "
        "gathers it whole and builds a whole gradient of it",
    ),
    Mutant(
        "picked-log-prob-off-by-one",
        "rlhf_jax/losses/logprobs.py",
        "    onehot = jnp.arange(logits.shape[-1]) == jnp.asarray(y)[..., None]\n",
        "    onehot = jnp.arange(logits.shape[-1]) == jnp.asarray(y)[..., None] + 1\n",
        ("tests/test_planner.py::test_chunked_logps_equal_numpy_and_hold_no_full_logits",),
        "chunked log-probs pick the wrong vocabulary entry",
    ),
    Mutant(
        "chunked-kl-reversed",
        "rlhf_jax/losses/kl.py",
        "        kl = exact_kl(logits, ref_logits)\n",
        "        kl = exact_kl(ref_logits, logits)\n",
        (
            "tests/test_losses_kl.py::test_chunked_logps_and_exact_kl_equal_numpy",
            "tests/test_train_ppo_update.py::test_chunked_rollout_equals_the_full_logits_rollout",
        ),
        "the chunked rollout KL is KL(pi_ref || pi) instead of KL(pi || pi_ref)",
    ),
    Mutant(
        "scanned-layers-one-window",
        "rlhf_jax/models/transformer.py",
        "x, masks[cfg.window(j)], rope.get(cfg.rope_key(j)),",
        "x, masks[cfg.window(0)], rope.get(cfg.rope_key(j)),",
        ("tests/test_scan_layers.py::test_scanned_layers_equal_the_unrolled_decoder",),
        "scanned Gemma layers all attend with the first layer's sliding window",
    ),
    Mutant(
        "scanned-layers-reversed",
        "rlhf_jax/models/transformer.py",
        "_stack_layers(self.variables, range(j, cfg.n_layers, period), cfg.compute_dtype)",
        "_stack_layers(self.variables, range(j, cfg.n_layers, period)[::-1], cfg.compute_dtype)",
        ("tests/test_scan_layers.py::test_scanned_layers_equal_the_unrolled_decoder",),
        "the scanned decoder runs its layers' weights in reverse order",
    ),
    Mutant(
        "to-host-skips-the-gather",
        "rlhf_jax/distributed.py",
        "            return np.asarray(multihost_utils.process_allgather(x, tiled=True))",
        "            return jax.device_get(x)",
        ("tests/test_multihost_drivers.py",),
        "a hand-over does not gather parameters split across hosts before the primary writes",
    ),
    # --- issue 26: random streams, critic-free update, temperatures ---
    # --- issue 26: logged metrics ---
    # --- issue 26: configuration, checkpoints, quantization, files, remat ---
)

# name -> why it is accepted (an equivalent mutant, or one no test can see by design).
ACCEPTED_SURVIVORS: dict[str, str] = {}


def _tree_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def _copy_tree(dest: Path, files: list[str], source: Path = ROOT) -> None:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / f, target)
    if (ROOT / "data").is_dir():  # the prepared offline task: read-only for the tests
        (dest / "data").symlink_to(ROOT / "data", target_is_directory=True)


def _apply(dest: Path, mutant: Mutant) -> None:
    path = dest / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: expected the line once in {mutant.path}, "
                         f"found it {count} times (update dev/mutants.py)")  # fmt: skip
    path.write_text(text.replace(mutant.old, mutant.new))


def _run_pytest(dest: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.monotonic() - start
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _first_failure(output: str) -> str:
    match = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    return match.group(1).split("tests/", 1)[-1] if match else ""


def _line_of(mutant: Mutant) -> int:
    text = (ROOT / mutant.path).read_text()
    return text[: text.find(mutant.old)].count("\n") + 1


def run_one(
    mutant: Mutant, files: list[str], timeout: float, snapshot: Path
) -> tuple[str, str, float]:
    """(result, detail, seconds) of one mutant in its own temporary copy of `snapshot`."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        dest = Path(tmp)
        _copy_tree(dest, files, snapshot)
        _apply(dest, mutant)
        code, output, seconds = _run_pytest(dest, mutant.tests, timeout)
    if code == 1:
        return "caught", _first_failure(output), seconds
    if code == 0:
        return "SURVIVED", "", seconds
    tail = output.strip().splitlines()[-1:] or ["no output"]
    return "ERROR", f"pytest exit {code}: {tail[0][:100]}", seconds


def run_baseline(
    tests: tuple[str, ...], files: list[str], timeout: float, snapshot: Path
) -> tuple[int, str]:
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        dest = Path(tmp)
        _copy_tree(dest, files, snapshot)
        code, output, _ = _run_pytest(dest, tests, timeout)
    return code, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = parser.parse_args(argv)

    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"--only: unknown mutant(s) {', '.join(unknown)}; choose from: "
                     + ", ".join(sorted(names)))  # fmt: skip
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    for m in mutants:  # every line still exists, before anything runs
        if (ROOT / m.path).read_text().count(m.old) != 1:
            parser.error(f"mutant {m.name}: its line is not (once) in {m.path}; update it")
    width = max(len(m.name) for m in mutants)
    if args.list:
        for m in mutants:
            print(f"{m.name:<{width}}  {m.path}:{_line_of(m)}  {m.why}  [{' '.join(m.tests)}]")
        return 0

    files = _tree_files()
    # One snapshot of the working tree at the start: edits made while the tool runs do not leak
    # into later mutants.
    with tempfile.TemporaryDirectory(prefix="mutant-snapshot-") as snap:
        _copy_tree(Path(snap), files)
        return _run_all(args, mutants, files, Path(snap), width)


def _run_all(args, mutants, files, snapshot, width) -> int:
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        if not args.no_baseline:
            union = tuple(sorted({t for m in mutants for t in m.tests}))
            print(f"baseline: {len(union)} test files on the unmutated tree ...", flush=True)
            code, output = run_baseline(union, files, args.timeout, snapshot)
            if code != 0:
                print(f"baseline FAILED (pytest exit {code}):\n{output[-3000:]}")
                return 1
        print(f"{len(mutants)} mutants, {args.jobs} at a time\n", flush=True)
        header = f"{'mutant':<{width}}  {'result':<8}  {'time':>6}  caught by / detail"
        print(header + "\n" + "-" * len(header), flush=True)
        results = {}
        futures = {pool.submit(run_one, m, files, args.timeout, snapshot): m for m in mutants}
        for future in concurrent.futures.as_completed(futures):
            m = futures[future]
            result, detail, seconds = future.result()
            if result == "SURVIVED" and m.name in ACCEPTED_SURVIVORS:
                result, detail = "accepted", ACCEPTED_SURVIVORS[m.name]
            results[m.name] = result
            print(f"{m.name:<{width}}  {result:<8}  {seconds:5.0f}s  {detail}", flush=True)

    counts = {r: list(results.values()).count(r) for r in sorted(set(results.values()))}
    print("\n" + ", ".join(f"{n} {r}" for r, n in counts.items()))
    bad = [n for n, r in results.items() if r in ("SURVIVED", "ERROR")]
    if bad:
        print("not caught: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
