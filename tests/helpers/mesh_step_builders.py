"""The four real training steps on a tiny GPT-2, for the mesh-equivalence and multi-host tests.

`build(name)` returns `(state, step_fn, batches)`: a host (NumPy) train state, the pure step from
`rlhf_jax.train` and three deterministic GLOBAL host batches, for name in `STEP_NAMES`:

  sft          make_sft_step on demonstration batches
  reward       make_reward_step (Bradley-Terry) on preference batches
  dpo          make_dpo_step (sigmoid) with a frozen reference model in `state.frozen`
  ppo_update   PPOFunctions.update on fixed, synthetic rollouts (epochs x minibatches)
  ppo_step     the fused PPO step: rollout (generation) + reward model + score + update

Dimensions divide every mesh axis of the tests (fsdp=4, tensor=2) so the partition rules really
split the parameters. Parameters are drawn with NumPy from `jax.eval_shape` shapes (no compile,
bit-identical on every process); the optimizer is `make_optimizer`'s AdamW (with clipping and
weight decay) with an `eps` large enough that the first Adam step, `g / (|g| + eps)`, is
well-conditioned: rounding-level gradient differences between layouts then move the params by
at most `lr / eps` times as much.

`build_dpo()` is the zero-argument builder that tests/helpers/multihost_worker.py imports
("helpers.mesh_step_builders:build_dpo").
"""

from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.models import (
    RewardModel,
    Transformer,
    ValueModel,
    get_config,
    init_params,
    init_reward_params,
    init_value_params,
)
from rlhf_jax.train import (
    PPOConfig,
    Rollout,
    create_ppo_state,
    create_train_state,
    make_dpo_step,
    make_optimizer,
    make_ppo,
    make_reward_step,
    make_sft_step,
    reward_model_fn,
)

STEP_NAMES = ("sft", "reward", "dpo", "ppo_update", "ppo_step")
CFG = get_config("tiny", vocab_size=64, max_len=32, d_model=32, n_layers=1, n_heads=4)
BATCH, SEQ = 8, 16  # 8 rows divide data x fsdp on every test mesh
PROMPT, NEW = 6, 6  # PPO prompt length and new tokens
EOS, PAD = 1, 0
NUM_STEPS = 3


def optimizer():
    return make_optimizer(1e-2, weight_decay=0.01, max_grad_norm=1.0, eps=1e-3)


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _numpy_init(shapes, seed: int):
    """N(0, 0.1) kernels/embeddings, N(0, 0.02) biases, 1 + N(0, 0.1) LayerNorm scales."""
    rs = np.random.RandomState(seed)

    def init(path, leaf):
        name = jax.tree_util.keystr(path)
        std = 0.02 if name.endswith("['bias']") else 0.1
        x = rs.randn(*leaf.shape) * std
        if name.endswith("['scale']"):
            x = x + 1.0
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, shapes)


def lm_params(seed: int):
    return _numpy_init(jax.eval_shape(lambda k: init_params(CFG, k), jax.random.PRNGKey(0)), seed)


def head_params(seed: int, init_fn=init_reward_params):
    shapes = jax.eval_shape(lambda k: init_fn(CFG, k), jax.random.PRNGKey(0))
    return _numpy_init(shapes, seed)


# --------------------------------------------------------------------------------------------
# Batches (right-padded training sequences, left-padded prompts; contract formats)


def _sequences(rs, prompts, t):
    """[prompt][response][EOS][pad...] rows; returns tokens, attention_mask, loss_mask."""
    b = len(prompts)
    tokens, attn, loss = (np.zeros((b, t), np.int32) for _ in range(3))
    for i, prompt in enumerate(prompts):
        n_p = len(prompt)
        n_r = rs.randint(1, t - n_p)  # response length; EOS follows
        tokens[i, :n_p] = prompt
        tokens[i, n_p : n_p + n_r] = rs.randint(2, CFG.vocab_size, n_r)
        tokens[i, n_p + n_r] = EOS
        attn[i, : n_p + n_r + 1] = 1
        loss[i, n_p : n_p + n_r + 1] = 1
    return tokens, attn, loss


def _prompts(rs, b=BATCH):
    return [rs.randint(2, CFG.vocab_size, rs.randint(1, 6)) for _ in range(b)]


def demonstration_batch(index: int):
    rs = np.random.RandomState([1, index])
    tokens, attn, loss = _sequences(rs, _prompts(rs), SEQ)
    return {"tokens": tokens, "attention_mask": attn, "loss_mask": loss}


def preference_batch(index: int, b: int = BATCH):
    rs = np.random.RandomState([2, index])
    prompts = _prompts(rs, b)
    out = {}
    for side in ("chosen", "rejected"):
        tokens, attn, loss = _sequences(rs, prompts, SEQ)
        out[f"{side}_tokens"], out[f"{side}_attention_mask"] = tokens, attn
        out[f"{side}_loss_mask"] = loss
    return out


def prompt_batch(index: int):
    """LEFT-padded prompts [B, PROMPT]."""
    rs = np.random.RandomState([3, index])
    tokens, mask = np.zeros((BATCH, PROMPT), np.int32), np.zeros((BATCH, PROMPT), np.int32)
    for i in range(BATCH):
        n = rs.randint(1, PROMPT + 1)
        tokens[i, PROMPT - n :] = rs.randint(2, CFG.vocab_size, n)
        mask[i, PROMPT - n :] = 1
    return {"prompt_tokens": tokens, "prompt_mask": mask}


def fixed_rollout(index: int) -> Rollout:
    """A synthetic scored rollout: random responses (some end in EOS), masked random numbers."""
    rs = np.random.RandomState([4, index])
    prompts = prompt_batch(index)
    lengths = rs.randint(1, NEW + 1, BATCH)
    mask = (np.arange(NEW)[None] < lengths[:, None]).astype(np.int32)  # [B, N]
    tokens = rs.randint(2, CFG.vocab_size, (BATCH, NEW)).astype(np.int32)
    has_eos = (rs.rand(BATCH) < 0.5).astype(np.int32)
    tokens[np.arange(BATCH), lengths - 1] = np.where(has_eos > 0, EOS, tokens[:, 0])
    tokens = np.where(mask > 0, tokens, PAD).astype(np.int32)

    def field(scale, shift=0.0):
        return (np.where(mask > 0, rs.randn(BATCH, NEW) * scale + shift, 0.0)).astype(np.float32)

    logps = field(0.5, -4.0)  # near log(1/64): ratios stay in a sensible range
    return Rollout(
        query_tokens=prompts["prompt_tokens"],
        query_mask=prompts["prompt_mask"],
        response_tokens=tokens,
        response_mask=mask,
        sample_logps=logps,
        logps=logps,
        ref_logps=field(0.5, -4.0),
        values=field(0.5),
        kl_exact=np.abs(field(0.1)),
        has_eos=has_eos,
        scores=rs.randn(BATCH).astype(np.float32),
        rewards=field(0.3),
        advantages=field(1.0),
        returns=field(1.0),
    )


# --------------------------------------------------------------------------------------------
# Builders: (host state, pure step, global host batches)


def build_sft():
    tx = optimizer()
    state = create_train_state(lm_params(10), tx, 0)
    step = make_sft_step(Transformer(CFG), tx)
    return _host(state), step, [demonstration_batch(i) for i in range(NUM_STEPS)]


def build_reward():
    tx = optimizer()
    state = create_train_state(head_params(11), tx, 0)
    step = make_reward_step(RewardModel(CFG), tx)
    return _host(state), step, [preference_batch(i) for i in range(NUM_STEPS)]


def build_dpo(batch_size: int = BATCH):
    """DPO (sigmoid, beta 0.1 in state.hparams) against a frozen reference (another init)."""
    tx = optimizer()
    state = create_train_state(lm_params(12), tx, 0, frozen=lm_params(13), hparams={"beta": 0.1})
    step = make_dpo_step(Transformer(CFG), tx)
    return _host(state), step, [preference_batch(i, batch_size) for i in range(NUM_STEPS)]


PPO_CFG = PPOConfig(
    kl_coef=0.05,
    kl_target=1.0,  # adaptive controller on
    ppo_epochs=2,
    num_minibatches=2,
    missing_eos_penalty=1.0,
    max_new_tokens=NEW,
    eos_id=EOS,
    pad_id=PAD,
)


def _ppo():
    tx_policy, tx_value = optimizer(), optimizer()
    fns = make_ppo(
        Transformer(CFG),
        ValueModel(CFG),
        tx_policy,
        tx_value,
        PPO_CFG,
        reward_fn=reward_model_fn(RewardModel(CFG)),
    )
    state = create_ppo_state(
        PPO_CFG,
        policy_params=lm_params(14),
        value_params=head_params(15, init_value_params),
        ref_params=lm_params(16),
        policy_optimizer=tx_policy,
        value_optimizer=tx_value,
        rng=0,
        reward_params=head_params(17),
    )
    return _host(state), fns


def build_ppo_update():
    state, fns = _ppo()
    return state, fns.update, [fixed_rollout(i) for i in range(NUM_STEPS)]


def build_ppo_step():
    state, fns = _ppo()
    return state, fns.step, [prompt_batch(i) for i in range(NUM_STEPS)]


BUILDERS = {
    "sft": build_sft,
    "reward": build_reward,
    "dpo": build_dpo,
    "ppo_update": build_ppo_update,
    "ppo_step": build_ppo_step,
}


def build(name: str):
    return BUILDERS[name]()


def run_single_device(name_or_built, num_steps: int = NUM_STEPS):
    """Plain `jax.jit` on one device: (per-step metrics as float dicts, final host state)."""
    state, step_fn, batches = (
        build(name_or_built) if isinstance(name_or_built, str) else name_or_built
    )
    step = jax.jit(step_fn)
    metrics = []
    for batch in batches[:num_steps]:
        state, m = step(state, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    return metrics, _host(state)
