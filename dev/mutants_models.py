"""Mutants of the model families, checkpoints, LoRA and QLoRA, the memory features (issue 14)
(`dev/mutants.py` runs them).
"""

from mutant_spec import FAMILY_TESTS, Mutant

MODELS = (
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
)
