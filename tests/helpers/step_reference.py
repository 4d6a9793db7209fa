"""Hand-written references for the training-step gradient tests.

Nothing here imports `rlhf_jax.losses` or `rlhf_jax.train`: token log-probs come from the logits
by an explicit log-sum-exp and a one-hot pick, each loss is written out from its paper's formula,
and the gradient is `jax.grad` of that plain function of `model.apply`. `assert_sgd_step` then
checks that one `optax.sgd(lr)` step of the library moved every parameter by `-lr ×` it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def token_logps(logits, targets):
    """log softmax(logits)[targets] by hand: [B, T, V], [B, T] -> [B, T] float32."""
    logits = logits.astype(F32)
    top = jnp.max(logits, axis=-1, keepdims=True)  # [B, T, 1]
    log_z = top[..., 0] + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))  # [B, T]
    picked = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=F32), axis=-1)
    return picked - log_z


def entropy(logits):
    """Entropy of softmax(logits) along the last axis, in float64 NumPy."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


def log_sigmoid(x):
    """log sigmoid(x) = -log(1 + exp(-x)), as logaddexp for large |x|."""
    return -jnp.logaddexp(0.0, -x)


def lm_logps(model, params, tokens, attention_mask, loss_mask):
    """Per-token log-probs of tokens[:, 1:] and their mask (loss_mask shifted): [B, T-1] each."""
    logits = model.apply({"params": params}, jnp.asarray(tokens), attention_mask=attention_mask)
    tlp = token_logps(logits[:, :-1], jnp.asarray(tokens)[:, 1:])  # [B, T-1]
    return tlp, jnp.asarray(loss_mask)[:, 1:].astype(F32)


def side_logps(model, params, batch, side, *, average=False):
    """Sequence log-probs of one side of a preference batch (its own forward): sum (or mean)
    of the masked token log-probs; also returns the token log-probs and mask."""
    tlp, m = lm_logps(
        model,
        params,
        batch[f"{side}_tokens"],
        batch[f"{side}_attention_mask"],
        batch[f"{side}_loss_mask"],
    )
    total = jnp.sum(tlp * m, axis=-1)  # [B]
    if average:
        total = total / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return total, tlp, m


def assert_sgd_step(old, new, grads, lr, *, rtol=1e-5):
    """`new == old - lr * grads` for one `optax.sgd(lr)` step, leaf by leaf.

    Per leaf, `||(new - old) + lr g|| <= rtol (||lr g|| + 1e-3 ||lr g||_tree) + 2^-24 ||new||`:
    relative to the leaf's own step, with a floor of 1e-3 of the whole tree's step for leaves
    whose gradient is zero in exact arithmetic (a reward head's bias, which cancels in
    r_c - r_r) and float32 noise in the library; the last term bounds the rounding of the
    float32 add `old - lr g` (half an ulp per entry). The gradient must not vanish as a whole
    (the check would be empty). Returns the largest relative error and its leaf.
    """
    assert jax.tree.structure(old) == jax.tree.structure(new) == jax.tree.structure(grads)
    leaves = [
        (jax.tree_util.keystr(path), *(np.asarray(x, np.float64) for x in (o, n, g)))
        for (path, o), n, g in zip(
            jax.tree_util.tree_leaves_with_path(old), jax.tree.leaves(new), jax.tree.leaves(grads)
        )
    ]
    tree_scale = lr * np.sqrt(sum(np.sum(g**2) for *_, g in leaves))
    assert tree_scale > 0.0, "the reference gradient is zero: the check is empty"
    worst = (0.0, "")
    for name, o, n, g in leaves:
        err = np.linalg.norm((n - o) + lr * g)
        scale = lr * np.linalg.norm(g)
        bound = rtol * (scale + 1e-3 * tree_scale) + 2.0**-24 * np.linalg.norm(n)
        assert err <= bound, (
            f"{name}: |update + lr*grad| = {err:.3g} > {bound:.3g} (|lr*grad| = {scale:.3g})"
        )
        worst = max(worst, (err / max(scale, 1e-30), name))
    return worst
