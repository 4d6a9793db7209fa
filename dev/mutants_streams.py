"""Mutants of issue 26: random streams, the critic-free update's structure, temperatures on both
sides (`dev/mutants.py` runs them).
"""

from mutant_spec import Mutant

STREAMS = (
    # --- issue 26: random streams, critic-free update, temperatures ---
    Mutant(
        "ppo-rollout-key-ignores-step",
        "rlhf_jax/train/ppo.py",
        "rng_sample = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), RNG_SAMPLE)",
        "rng_sample = jax.random.fold_in(state.rng, RNG_SAMPLE)",
        (
            "tests/test_random_streams.py::test_ppo_rollout_samples_afresh_each_iteration_and_repeats_a_step",
        ),
        "PPO samples the same completions at every iteration (the key ignores the step)",
    ),
    Mutant(
        "critic-free-rollout-key-ignores-step",
        "rlhf_jax/train/critic_free.py",
        "rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)",
        "rng = jax.random.fold_in(state.rng, 0)",
        (
            "tests/test_random_streams.py::test_critic_free_rollout_samples_afresh_each_iteration_and_repeats_a_step",
        ),
        "the critic-free rollout samples the same completions at every iteration",
    ),
    Mutant(
        "ppo-minibatch-key-ignores-step",
        "rlhf_jax/train/ppo_update.py",
        "rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), RNG_MINIBATCH)",
        "rng = jax.random.fold_in(state.rng, RNG_MINIBATCH)",
        (
            "tests/test_random_streams.py::test_ppo_minibatches_are_a_fresh_partition_per_epoch_and_per_iteration",
        ),
        "PPO cuts every iteration's rollout into the same minibatches",
    ),
    Mutant(
        "ppo-epochs-share-a-permutation",
        "rlhf_jax/train/ppo_update.py",
        "joint, metrics = jax.lax.scan(epoch, joint, jax.random.split(rng, cfg.ppo_epochs))",
        "joint, metrics = jax.lax.scan(epoch, joint, jnp.stack([rng] * cfg.ppo_epochs))",
        (
            "tests/test_random_streams.py::test_ppo_minibatches_are_a_fresh_partition_per_epoch_and_per_iteration",
        ),
        "every PPO epoch uses the first epoch's minibatches",
    ),
    Mutant(
        "microbatches-share-a-key",
        "rlhf_jax/train/step.py",
        "sub = None if key is None else jax.random.fold_in(key, i)",
        "sub = key",
        (
            "tests/test_random_streams.py::test_make_step_draws_a_loss_key_per_step_and_per_microbatch",
        ),
        "every microbatch of an accumulated step draws the same dropout masks",
    ),
    Mutant(
        "loss-key-ignores-step",
        "rlhf_jax/train/step.py",
        "return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), RNG_LOSS)",
        "return jax.random.fold_in(state.rng, RNG_LOSS)",
        (
            "tests/test_random_streams.py::test_make_step_draws_a_loss_key_per_step_and_per_microbatch",
        ),
        "a keyed loss (LoRA dropout) draws the same masks at every step",
    ),
    Mutant(
        "scanned-layers-share-a-dropout-key",
        "rlhf_jax/models/transformer.py",
        "keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(cfg.n_layers))",
        "keys = jax.vmap(lambda i: jax.random.fold_in(base, 0))(jnp.arange(cfg.n_layers))",
        ("tests/test_random_streams.py::test_lora_dropout_draws_a_fresh_mask_in_every_layer",),
        "every layer of the scanned stack drops the same LoRA inputs",
    ),
    Mutant(
        "lora-adapters-share-a-key",
        "rlhf_jax/lora/adapters.py",
        "jax.random.fold_in(rng, i), (*in_shape, cfg.rank), jnp.float32, -bound, bound",
        "rng, (*in_shape, cfg.rank), jnp.float32, -bound, bound",
        ("tests/test_random_streams.py::test_lora_adapters_start_from_a_draw_of_their_own",),
        "every adapter of a shape starts from the same A",
    ),
    Mutant(
        "pair-key-ignores-split",
        "rlhf_jax/pairs.py",
        "return jax.random.fold_in(jax.random.PRNGKey(seed), SPLITS.index(split))",
        "return jax.random.fold_in(jax.random.PRNGKey(seed), 0)",
        ("tests/test_random_streams.py::test_pair_keys_differ_by_split_and_seed_and_repeat",),
        "the train and test preference pairs are sampled with one key",
    ),
    Mutant(
        "eval-chunks-share-a-key",
        "rlhf_jax/eval/common.py",
        "prompt_mask[idx], jax.random.fold_in(rng, i),",
        "prompt_mask[idx], rng,",
        ("tests/test_random_streams.py::test_evaluation_chunks_draw_from_their_own_keys",),
        "every chunk of evaluation rows repeats the first chunk's draws",
    ),
    Mutant(
        "eval-single-chunk-unfolded",
        "rlhf_jax/eval/common.py",
        "prompt_mask[idx], jax.random.fold_in(rng, i),",
        "prompt_mask[idx], jax.random.fold_in(rng, i) if batch_size else rng,",
        ("tests/test_random_streams.py::test_evaluation_chunks_draw_from_their_own_keys",),
        "one chunk samples with the raw key: the first rows depend on the number of rows",
    ),
    Mutant(
        "critic-free-minibatches-strided",
        "rlhf_jax/train/critic_free.py",
        "chunks = jax.tree.map(lambda x: x.reshape(k, b // k, *x.shape[1:]), ro)",
        "chunks = jax.tree.map(lambda x: x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1), ro)",
        ("tests/test_train_critic_free_update.py",),
        "critic-free minibatches take strided rows: every group is split",
    ),
    Mutant(
        "critic-free-minibatches-reversed",
        "rlhf_jax/train/critic_free.py",
        "chunks = jax.tree.map(lambda x: x.reshape(k, b // k, *x.shape[1:]), ro)",
        "chunks = jax.tree.map(lambda x: x.reshape(k, b // k, *x.shape[1:])[::-1], ro)",
        ("tests/test_train_critic_free_update.py",),
        "critic-free minibatches run last block first",
    ),
    Mutant(
        "critic-free-one-epoch",
        "rlhf_jax/train/critic_free.py",
        "state, metrics = jax.lax.scan(epoch, state, None, length=cfg.epochs)",
        "state, metrics = jax.lax.scan(epoch, state, None, length=1)",
        ("tests/test_train_critic_free_update.py",),
        "the critic-free update runs one epoch whatever `epochs` says",
    ),
    Mutant(
        "critic-free-group-split-allowed",
        "rlhf_jax/train/critic_free.py",
        "if b % (k * cfg.group_size):",
        "if b % k:",
        ("tests/test_train_critic_free_update.py",),
        "num_minibatches that split a group is accepted",
    ),
    Mutant(
        "critic-free-metrics-of-the-last-step",
        "rlhf_jax/train/critic_free.py",
        "return state, {**jax.tree.map(jnp.mean, metrics), **stats}",
        "return state, {**jax.tree.map(lambda m: m[-1, -1], metrics), **stats}",
        ("tests/test_train_critic_free_update.py",),
        "the critic-free update reports its last minibatch's metrics, not their mean",
    ),
    Mutant(
        "critic-free-rollout-ref-untempered",
        "rlhf_jax/train/critic_free.py",
        "model, ref, tokens, mask, r_tok, p, cfg.temperature",
        "model, ref, tokens, mask, r_tok, p, 1.0",
        (
            "tests/test_temperatures.py::test_critic_free_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
        ),
        "the critic-free reference log-probs (its KL) at temperature 1, the policy's at T",
    ),
    Mutant(
        "critic-free-rollout-policy-untempered",
        "rlhf_jax/train/critic_free.py",
        "logps, _ = response_logps_entropy(model, policy, tokens, mask, r_tok, p, cfg.temperature)",
        "logps, _ = response_logps_entropy(model, policy, tokens, mask, r_tok, p, 1.0)",
        (
            "tests/test_temperatures.py::test_critic_free_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
        ),
        "the critic-free rollout's old log-probs at temperature 1",
    ),
    Mutant(
        "critic-free-loss-untempered",
        "rlhf_jax/train/critic_free.py",
        "model, params, tokens, mask, ro.response_tokens, p, cfg.temperature",
        "model, params, tokens, mask, ro.response_tokens, p, 1.0",
        (
            "tests/test_temperatures.py::test_critic_free_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
        ),
        "the critic-free loss's new log-probs at temperature 1 against old ones at T",
    ),
    Mutant(
        "critic-free-sampler-untempered",
        "rlhf_jax/train/critic_free_config.py",
        "return SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)",
        "return SamplingConfig(self.max_new_tokens, 1.0, self.top_k, self.top_p)",
        ("tests/test_temperatures.py::test_critic_free_rollout_samples_at_its_temperature",),
        "the critic-free rollout samples at temperature 1 and scores at T",
    ),
    Mutant(
        "ppo-sampler-untempered",
        "rlhf_jax/train/ppo.py",
        "return SamplingConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p)",
        "return SamplingConfig(self.max_new_tokens, 1.0, self.top_k, self.top_p)",
        (
            "tests/test_temperatures.py::test_ppo_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
        ),
        "PPO samples at temperature 1 and scores at T",
    ),
    Mutant(
        "rollout-ref-untempered",
        "rlhf_jax/train/logps.py",
        "logits, ref_logits = logits / temperature, ref_logits / temperature  # [B, n, V]",
        "logits, ref_logits = logits / temperature, ref_logits  # [B, n, V]",
        (
            "tests/test_temperatures.py::test_ppo_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
        ),
        "PPO's reference log-probs and exact KL with the reference at temperature 1",
    ),
    Mutant(
        "chunked-rollout-untempered",
        "rlhf_jax/train/logps.py",
        "h[:, window], w, rh[:, window], rw, targets, **chunk_options(cfg, temperature)",
        "h[:, window], w, rh[:, window], rw, targets, **chunk_options(cfg)",
        (
            "tests/test_temperatures.py::test_ppo_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
        ),
        "the chunked PPO rollout's log-probs and KL at temperature 1",
    ),
    Mutant(
        "chunked-kl-ref-untempered",
        "rlhf_jax/losses/kl.py",
        "logits, ref_logits = logits_of(h_i, weight), logits_of(r_i, ref_weight)",
        "logits, ref_logits = logits_of(h_i, weight), logits_of(r_i, ref_weight) * temperature",
        (
            "tests/test_temperatures.py::test_ppo_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
        ),
        "the chunked rollout's reference side at temperature 1, the policy's at T",
    ),
    Mutant(
        "chunked-target-logps-untempered",
        "rlhf_jax/train/logps.py",
        "hidden[:, window], weight, targets, **chunk_options(cfg, temperature)",
        "hidden[:, window], weight, targets, **chunk_options(cfg)",
        (
            "tests/test_temperatures.py::test_critic_free_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
            "tests/test_temperatures.py::test_ppo_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
        ),
        "chunked teacher-forced log-probs (the losses', the critic-free rollout's) at T = 1",
    ),
    Mutant(
        "ppo-loss-untempered",
        "rlhf_jax/train/ppo_update.py",
        "policy_model, policy_params, tokens, mask, r_tok, p, cfg.temperature",
        "policy_model, policy_params, tokens, mask, r_tok, p, 1.0",
        (
            "tests/test_temperatures.py::test_ppo_rollout_and_loss_use_the_sampling_temperature_on_both_sides",
        ),
        "the PPO loss's new log-probs at temperature 1 against old ones at T",
    ),
    Mutant(
        "eval-ref-untempered",
        "rlhf_jax/eval/common.py",
        "ref_logits = _response_logits(model, ref_params, *args) / scale  # [B, N, V]",
        "ref_logits = _response_logits(model, ref_params, *args)  # [B, N, V]",
        ("tests/test_eval.py::test_kl_matches_numpy_on_a_teacher_forced_forward",),
        "evaluation's KL with the reference at temperature 1 (an existing test)",
    ),
)
