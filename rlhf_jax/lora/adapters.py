"""LoRA (Hu et al. 2021) on every model family: adapters as their own parameter tree, the frozen
base as the reference policy with no second copy of the weights.

    lora_cfg = LoraConfig(rank=16, alpha=32)               # targets: a regex over module paths
    adapters = init_adapters(base_params, lora_cfg, rng)   # {"layers_0": {"attn": {"q": {a, b}}}}
    model = LoraTransformer(cfg, lora_cfg)
    model.apply({"params": {"base": base, "lora": adapters}}, tokens)   # W + (alpha / r) B A
    model.apply({"params": {"base": base}}, tokens)                      # the base: adapters off
    merged = merge(base, adapters, lora_cfg)               # a plain tree for `save_pretrained`

Reward and value models take adapters on their trunk the same way (`LoraRewardModel`,
`LoraValueModel`), their head trained in full beside them: the trained tree is then
`trained(adapters, {"head": head})` and the model reads `view(that, {"transformer": trunk})`.

Training trains only the adapters: `lora_loss(loss_fn)` turns a loss of the step contract
written for `LoraTransformer` (policy params `{"base", "lora"}`) into a loss of the adapters,
with `frozen = {"base": base}`. The reference the inner loss sees is `{"base": base}` (the same
arrays: the base with its adapters off) unless `frozen["ref"]` names another one, so a DPO step
holds exactly one copy of the base, gradients and optimizer state exist for the adapters only,
and `make_step(lora_loss(make_dpo_loss(LoraTransformer(cfg, lora_cfg))), optimizer)` with
`create_train_state(adapters, optimizer, rng, frozen={"base": base})` is the whole recipe.

The adapter of a projection whose kernel is `[*in, *out]` is A `[*in, r]` and B `[r, *out]`
(q: A [D, r], B [r, H, Dh]; o: A [H, Dh, r], B [r, D]), so the partition rules keep whole heads;
A starts as PEFT's (Kaiming-uniform, bound 1 / sqrt(fan_in)), B at zero, so a fresh adapter
leaves the model unchanged. The projection's arithmetic is in `models.projection`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.models import quant
from rlhf_jax.models.heads import RewardModel, ValueModel
from rlhf_jax.models.projection import LORA, LORA_DROPOUT_RNG
from rlhf_jax.models.transformer import Transformer

# Every attention and MLP projection (module paths look like "layers_0/attn/q").
DEFAULT_TARGETS = r"(^|/)(attn/(q|k|v|o)|mlp/(gate|up|down))$"
# Projections whose kernel contracts two input axes ([H, Dh, D]); the others contract one.
_IN_AXES = {"o": 2}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get adapters, and their size.

    Attributes:
      rank: r (>= 1).
      alpha: the scale is alpha / r (> 0).
      dropout: dropout rate on the adapters' input, in [0, 1), applied only in training steps
        (`lora_loss` receives a key per step from `train.make_step`); sampling, evaluation and
        the reference (adapters off) never drop. The on-policy methods (PPO, critic-free) refuse
        it: their ratio to the sampling policy would not start at 1.
      targets: a regular expression searched in each projection's module path
        ("layers_3/attn/q", "layers_0/mlp/down", ...).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(
                f"LoRA targets {self.targets!r} is not a regular expression: {e}"
            ) from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_modules(params: Mapping[str, Any], cfg: LoraConfig | str) -> list[tuple[str, ...]]:
    """The module paths (tuples of keys) of the projections `cfg.targets` (or the pattern `cfg`)
    selects: every subtree with a kernel (float or quantized) whose path matches, the token
    embedding, the LM head and a reward / value head excluded.

    Raises:
      ValueError: the pattern matches no projection (naming what paths look like).
    """
    pattern = cfg if isinstance(cfg, str) else cfg.targets
    found, candidates = [], []

    def visit(tree, path):
        if not isinstance(tree, Mapping):
            return
        has_kernel = "kernel" in tree or quant.is_quantized(dict(tree))
        if has_kernel and path and path[-1] not in ("lm_head", "head"):
            candidates.append("/".join(path))
            if re.search(pattern, "/".join(path)):
                found.append(path)
        for key, sub in tree.items():
            visit(sub, (*path, key))

    visit(params, ())
    if not found:
        shown = ", ".join(candidates[:4])
        raise ValueError(
            f"LoRA targets {cfg.targets!r} match no projection; paths look like {shown}"
        )
    return found


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_adapters(params: Mapping[str, Any], cfg: LoraConfig, rng: Any) -> dict:
    """Fresh adapters for the targeted projections of `params` (float32): A Kaiming-uniform
    (PEFT's default: bound 1 / sqrt(fan_in)), B zeros, so the adapted model equals the base."""
    adapters: dict = {}
    for i, path in enumerate(target_modules(params, cfg)):
        shape = _kernel_shape(_get(params, path))
        n_in = _IN_AXES.get(path[-1], 1)
        in_shape, out_shape = shape[:n_in], shape[n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(
            jax.random.fold_in(rng, i), (*in_shape, cfg.rank), jnp.float32, -bound, bound
        )
        _set(adapters, path, {"a": a, "b": jnp.zeros((cfg.rank, *out_shape), jnp.float32)})
    return adapters


def _delta(adapter: Mapping[str, Any]) -> jax.Array:
    """B A as a kernel-shaped array: [*in, r] x [r, *out] -> [*in, *out]."""
    return jnp.tensordot(adapter["a"], adapter["b"], axes=1)


def merge(params: Mapping[str, Any], adapters: Mapping[str, Any], cfg: LoraConfig) -> dict:
    """The base with every adapter folded in, `kernel + (alpha / r) B A`: a plain parameter tree
    of the same family (for `models.save_pretrained`, or a faster forward). A quantized base
    (`quantize_base`) is dequantized first."""
    out = dequantize_base(params)  # new containers, the same (or dequantized) leaves

    def fold(tree, path):
        for key, sub in tree.items():
            if isinstance(sub, Mapping) and set(sub) == {"a", "b"}:
                node = _get(out, (*path, key))
                kernel = node["kernel"]
                node["kernel"] = (kernel + cfg.scale * _delta(sub)).astype(kernel.dtype)
            elif isinstance(sub, Mapping):
                fold(sub, (*path, key))

    fold(adapters, ())
    return out


def _kernel_shape(module: Mapping[str, Any]) -> tuple[int, ...]:
    if "kernel" in module:
        return tuple(module["kernel"].shape)
    return quant.kernel_shape(dict(module))


def quantize_base(params: Mapping[str, Any], mode: str, *, targets: str = DEFAULT_TARGETS) -> dict:
    """QLoRA's base (Dettmers et al. 2023): every projection `targets` selects stored as int8
    (per-output-channel absmax) or NF4 (blocks of 64), dequantized inside the forward
    (`models.quant`); embeddings, norms, biases and the LM head stay float32."""
    out = jax.tree.map(lambda x: x, dict(params))
    for path in target_modules(params, targets):
        node = _get(out, path)
        if "kernel" not in node:
            continue  # already quantized
        kernel = node.pop("kernel")
        node.update(quant.quantize_kernel(kernel, mode, n_in=_IN_AXES.get(path[-1], 1)))
    return out


def dequantize_base(params: Mapping[str, Any]) -> dict:
    """`params` with every quantized kernel back in float32 (new containers, other leaves
    shared)."""
    out = jax.tree.map(lambda x: x, dict(params))

    def visit(tree, path):
        for key, sub in list(tree.items()):
            if not isinstance(sub, dict):
                continue
            if quant.is_quantized(sub):
                leaves = {k: sub.pop(k) for k in quant.QUANT_LEAVES if k in sub}
                sub["kernel"] = quant.dequantize_kernel(leaves)
            else:
                visit(sub, (*path, key))

    visit(out, ())
    return out


QUANTIZE = ("none", "int8", "nf4")


def prepare(
    params: Mapping[str, Any], cfg: LoraConfig, rng: Any, *, quantize: str = "none"
) -> tuple[dict, dict]:
    """(fresh adapters, the frozen base) for a run: the base quantized for QLoRA when
    `quantize` is "int8" or "nf4"."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    adapters = init_adapters(params, cfg, rng)
    base = dict(params) if quantize == "none" else quantize_base(params, quantize)
    return adapters, base


def lora_collection(adapters: Mapping[str, Any], cfg: LoraConfig) -> dict:
    """The "lora" variable collection of `models.projection.Projection`: each adapter {a, b}
    with its scale (alpha / r) and, when `cfg.dropout` > 0, its dropout rate."""
    extra = {"scale": jnp.float32(cfg.scale)}
    if cfg.dropout > 0:
        extra["dropout"] = jnp.float32(cfg.dropout)
    return _with_extra(adapters, extra)


def _with_extra(tree: Mapping[str, Any], extra: dict) -> dict:
    if set(tree) == {"a", "b"}:
        return {"a": tree["a"], "b": tree["b"], **extra}
    return {k: _with_extra(v, extra) for k, v in tree.items()}


# The keys of an adapted model's params (`view`): the frozen base, the adapters, the modules
# trained in full beside them (PEFT's modules_to_save, e.g. a reward model's head) and the
# training step's dropout key.
VIEW_KEYS = ("base", "lora", "modules", "dropout_rng")
# A trained tree with modules beside the adapters: {"lora": adapters, "modules": {...}}.
TRAINED_KEYS = ("lora", "modules")


def trained(adapters: Mapping[str, Any], modules: Mapping[str, Any] | None = None) -> Any:
    """What a LoRA run trains: the adapters, or `{"lora": adapters, "modules": modules}` when
    top-level modules (a reward or value head) train in full beside them."""
    return adapters if modules is None else {"lora": adapters, "modules": dict(modules)}


def split_trained(params: Any) -> tuple[Any, Any]:
    """(adapters, modules or None) of a `trained` tree."""
    if isinstance(params, Mapping) and set(params) == set(TRAINED_KEYS):
        return params["lora"], params["modules"]
    return params, None


def view(params: Any, base: Mapping[str, Any], rng: Any = None) -> dict:
    """The params an adapted model (`LoraTransformer`, `LoraRewardModel`, `LoraValueModel`)
    reads: the trained tree (`trained`) on its frozen `base`, with `rng` the dropout key of a
    training step (None: no dropout)."""
    adapters, modules = split_trained(params)
    out = {"base": base, "lora": adapters}
    if modules is not None:
        out["modules"] = modules
    if rng is not None:
        out["dropout_rng"] = rng
    return out


def _adapted_variables(variables: Any, cfg: LoraConfig) -> tuple[Any, dict]:
    """(plain variables, rngs) for an adapted model's `apply`: `{"base", "lora"?, "modules"?,
    "dropout_rng"?}` params become the base's params (modules merged over its top level) plus
    the "lora" collection; other variables pass unchanged."""
    params = variables.get("params") if isinstance(variables, Mapping) else None
    if not (isinstance(params, Mapping) and "base" in params and set(params) <= set(VIEW_KEYS)):
        return variables, {}
    plain = {**params["base"], **params.get("modules", {})}
    variables = {**variables, "params": plain}
    rngs = {}
    if "lora" in params:
        variables[LORA] = lora_collection(params["lora"], cfg)
        if cfg.dropout > 0 and params.get("dropout_rng") is not None:
            rngs[LORA_DROPOUT_RNG] = params["dropout_rng"]
    return variables, rngs


def _apply(module, parent_apply, variables, *args, **kwargs):
    variables, rngs = _adapted_variables(variables, module.lora)
    if rngs:
        kwargs["rngs"] = {**kwargs.get("rngs", {}), **rngs}
    return parent_apply(variables, *args, **kwargs)


class LoraTransformer(Transformer):
    """The decoder with adapters: `apply({"params": {"base": base, "lora": adapters}}, ...)` runs
    `W + (alpha / r) B A`; `apply({"params": {"base": base}}, ...)` the base alone; a plain
    parameter tree runs as `Transformer`. Every method (`decode`, `hidden`, `logits`) and every
    caller of a `Transformer` (losses, `generate`, evaluation) works unchanged."""

    lora: LoraConfig = LoraConfig()

    def apply(self, variables, *args, **kwargs):
        return _apply(self, super().apply, variables, *args, **kwargs)


class LoraRewardModel(RewardModel):
    """`models.RewardModel` with adapters on its trunk: params `view(trained(adapters,
    {"head": head}), {"transformer": trunk})`, adapters from `init_adapters` on the whole
    reward-model tree (so they sit under "transformer"), the head trained in full beside them
    (PEFT's modules_to_save)."""

    lora: LoraConfig = LoraConfig()

    def apply(self, variables, *args, **kwargs):
        return _apply(self, super().apply, variables, *args, **kwargs)


class LoraValueModel(ValueModel):
    """`models.ValueModel` with adapters on its trunk and the head trained beside them (as
    `LoraRewardModel`); PPO puts it on the reward model's frozen trunk (or the policy's base)."""

    lora: LoraConfig = LoraConfig()

    def apply(self, variables, *args, **kwargs):
        return _apply(self, super().apply, variables, *args, **kwargs)


ADAPTED = (LoraTransformer, LoraRewardModel, LoraValueModel)


def check_no_dropout(model: Any, who: str) -> None:
    """Refuses an adapted `model` with dropout for an on-policy method (`who`): its ratio to the
    sampling policy (no dropout) would not start at 1."""
    if isinstance(model, ADAPTED) and model.lora.dropout > 0:
        raise ValueError(
            f"LoRA dropout {model.lora.dropout}: {who} sample with the policy they train, so "
            "set dropout to 0 (it is for SFT, the reward model and the DPO family)"
        )


def lora_loss(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """A loss of the trained tree (`trained`: the adapters, and any modules trained beside them)
    from `loss_fn(params, batch, *, frozen, hparams)` written for an adapted model: it is called
    with params `view(trained, frozen["base"], rng)` and frozen `frozen.get("ref", {"base":
    frozen["base"]})`, the base with its adapters off (the same arrays, no copy). Only the
    trained tree is differentiated; `rng` (passed by `train.make_step`) keys the adapters'
    dropout."""

    def wrapped(params, batch, *, frozen, hparams, rng=None):
        if not isinstance(frozen, Mapping) or "base" not in frozen:
            raise ValueError(
                "a LoRA step needs state.frozen = {'base': base params} (and optionally 'ref')"
            )
        base = frozen["base"]
        ref = frozen.get("ref", {"base": base})
        return loss_fn(view(params, base, rng), batch, frozen=ref, hparams=hparams)

    return wrapped
