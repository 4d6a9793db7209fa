"""Device mesh, parameter partition rules, batch sharding and the one step compiler (the hosts of a
multi-host run: `rlhf_jax.distributed`).

Everything that decides where arrays live is in this module (house style item 6, after
big_vision's `sharding.py`): library code stays un-jitted and mesh-agnostic, and a driver does

    distributed.init_distributed()                       # no-op on one host
    mesh = make_mesh(**parse_mesh_spec("data=2,fsdp=4,tensor=1"))
    state = shard_state(state, mesh)
    batch = shard_batch(host_batch, mesh)                # this host's rows: process_batch_rows
    train_step = compile_step(step, mesh, state, batch)  # in/out shardings + donation
    state, metrics = train_step(state, batch)

The mesh has three axes. `data` and `fsdp` both split the batch; `fsdp` also splits the model
width of every large parameter (ZeRO-3 style: XLA all-gathers a weight before it is used), and
`tensor` splits heads / the MLP hidden dimension / the vocabulary (Megatron style).

Axis types. `jax.make_mesh` defaults to `AxisType.Explicit` in jax 0.10-0.12 (sharding in types).
We pass `AxisType.Auto` on purpose: under Explicit axes an unmodified Flax model does not trace once
its parameters are sharded. Measured on jax 0.10.2, a GPT-2-like block under
`jit(in_shardings=..., out_shardings=...)` raises `ShardingTypeError` at `nn.Embed`'s gather
("use `.at[...].get(out_sharding=)`") and at every `x @ kernel` whose contracting dim is split over
`fsdp` ("dot_general ... produces an illegally sharded result"), so each model op would need an
`out_sharding` annotation. With Auto axes GSPMD propagates shardings from the jit boundary and the
same code compiles on every mesh shape, which is what the "one table + one compile helper" design
needs. `compile_step` still traces under `jax.set_mesh(mesh)`, so model code may use bare
`PartitionSpec`s in `jax.lax.with_sharding_constraint`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")  # the leading (batch) dim of every batch array

# Name pattern (re.search on the '/'-joined path) -> PartitionSpec; first match wins. The patterns
# end at the parameter name, so they also hit optimizer moments (`opt_state/0/mu/h_0/...`), frozen
# reference params (`frozen/...`) and reward/value backbones (`transformer/...`). A spec shorter
# than the array is aligned with its trailing dims (stacked layers / sweeps keep a free leading
# dim); a mesh axis that does not divide its dim is dropped for that dim.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    # One table for every family (models/transformer.py gives them one parameter layout).
    # Attention projections keep their head axis, so "tensor" splits whole heads: q/k/v kernels
    # [D, heads, Dh] are column parallel over heads (GQA's kv heads split when their count
    # divides the tensor axis, else replicated), the output projection [H, Dh, D] row parallel.
    (r"(^|/)embed/embedding$", P("tensor", "fsdp")),  # [V, D]: vocab over tensor, width fsdp
    (r"pos_embed/embedding$", P(None, "fsdp")),  # [max_len, D]
    # QLoRA's quantized kernels (models.quant) split like the kernels they replace (NF4's last
    # axis is halved), their per-channel int8 scales like biases, NF4's flat absmax replicated.
    (r"attn/[qkv]/kernel(_int8|_nf4)?$", P("fsdp", "tensor", None)),  # [D, heads, Dh]
    (r"attn/[qkv]/(bias|kernel_scale)$", P("tensor", None)),  # [heads, Dh]
    (r"attn/o/kernel(_int8|_nf4)?$", P("tensor", None, "fsdp")),  # [H, Dh, D]
    (r"mlp/(gate|up)/kernel(_int8|_nf4)?$", P("fsdp", "tensor")),  # [D, F]: column parallel
    (r"mlp/(gate|up)/(bias|kernel_scale)$", P("tensor")),  # [F]
    (r"mlp/down/kernel(_int8|_nf4)?$", P("tensor", "fsdp")),  # [F, D]: row parallel
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]: vocab over tensor
    # LoRA adapters (rlhf_jax.lora): A [*in, r] split like the kernel's input axes, B [r, *out]
    # like its output axes (whole heads over tensor); r is never split.
    (r"attn/[qkv]/a$", P("fsdp", None)),  # [D, r]
    (r"attn/[qkv]/b$", P(None, "tensor", None)),  # [r, heads, Dh]
    (r"attn/o/a$", P("tensor", None, None)),  # [H, Dh, r]
    (r"attn/o/b$", P(None, "fsdp")),  # [r, D]
    (r"mlp/(gate|up)/a$", P("fsdp", None)),  # [D, r]
    (r"mlp/(gate|up)/b$", P(None, "tensor")),  # [r, F]
    (r"mlp/down/a$", P("tensor", None)),  # [F, r]
    (r"mlp/down/b$", P(None, "fsdp")),  # [r, D]
    (r".*", P()),  # norms, output biases, reward/value heads, step, rng, optax counts
)


# --------------------------------------------------------------------------------------------
# Mesh


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """Parses a command-line mesh spec such as "data=2,fsdp=4,tensor=1" into keyword arguments.

    Args:
      spec: comma-separated `axis=size` pairs over "data", "fsdp", "tensor"; axes left out keep
        `make_mesh`'s defaults; a size of -1 means "all remaining devices".
    Returns:
      A dict for `make_mesh(**parse_mesh_spec(spec))`.
    """
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in MESH_AXES or name in out:
            raise ValueError(
                f"bad mesh spec {spec!r}: expected comma-separated axis=size pairs over "
                f"{', '.join(MESH_AXES)} (each at most once), e.g. 'data=2,fsdp=4,tensor=1'"
            )
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh spec {spec!r}: size of {name!r} must be an int") from None
    return out


def _spec_str(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Any = None) -> Mesh:
    """Builds the ("data", "fsdp", "tensor") mesh over all (or the given) devices, Auto axis types.

    Args:
      data: data-parallel size; -1 fills with the devices the other axes leave.
      fsdp: size of the axis that splits both the batch and the parameters' width.
      tensor: tensor-parallel size (heads, MLP hidden, vocab).
      devices: devices to use (default `jax.devices()`, all processes).
    Returns:
      A `Mesh` whose axis types are `AxisType.Auto` (see the module docstring for why).
    Raises:
      ValueError: the sizes do not multiply to the device count, naming what would.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(
            f"mesh {_spec_str(sizes)}: sizes must be positive, with at most one -1 (fill); "
            f"{n} devices are available"
        )
    if free:
        rest = math.prod(s for s in sizes.values() if s != -1)
        if n % rest:
            raise ValueError(
                f"mesh {_spec_str(sizes)}: {n} devices cannot be split into groups of {rest} "
                f"(the product of the fixed axes); choose axis sizes whose product is {n}"
            )
        sizes[free[0]] = n // rest
    need = math.prod(sizes.values())
    if need != n:
        raise ValueError(
            f"mesh {_spec_str(sizes)} needs {need} devices but {n} are available; "
            f"choose axis sizes whose product is {n}"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on `mesh` (scalars, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over data x fsdp, other dims replicated: P(("data", "fsdp"))."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _pinned(x: Any, dims: tuple, mesh: Any) -> list:
    """The PartitionSpec entries pinning `x`'s leading dims to `dims` on `mesh`: per dim, the
    named axes that are on the mesh with size > 1, kept in order while their product divides
    the dim (the rest dropped)."""
    spec = []
    for size, axes in zip(x.shape, dims):
        names, split = [], 1
        for a in (axes,) if isinstance(axes, str) else tuple(axes or ()):
            n = mesh.shape[a] if a in mesh.axis_names else 1
            if n > 1 and size % (split * n) == 0:
                names.append(a)
                split *= n
        spec.append(None if not names else names[0] if len(names) == 1 else tuple(names))
    return spec


def constrain(x: Any, *dims: str | tuple[str, ...] | None) -> Any:
    """Inside a traced step: pins `x`'s leading dims to mesh axes (`dims[i]` for dim i: an axis,
    a tuple of axes or None) on the mesh the step is compiled under (`jax.set_mesh`, as
    `compile_step` does). A no-op without such a mesh, or when every named axis drops out; an
    axis that is absent, of size 1 or does not divide its dim is dropped. Library code calls it
    where sharding propagation chooses badly on its own, e.g. where rows are born in a loop
    (sampled completions) or where a matmul's contraction is split like its rows.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or getattr(x, "ndim", 0) < len(dims):
        return x
    spec = _pinned(x, dims, mesh)
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, P(*spec))


VOCAB_AXES: tuple[str, str] = (
    "fsdp",
    "tensor",
)  # the output layer's vocabulary in a log-prob chunk


def vocab_parallel(kind: str, x: Any, *, vocab_size: int, vocab_major: bool = False) -> Any:
    """`losses.chunked_target_logps`'s `pin`: one chunk of log-probs computed vocabulary-parallel
    (Megatron's cross-entropy, on the fsdp and tensor axes). The weight is split over the
    vocabulary on `VOCAB_AXES` (`kind` "weight": [D, V], or [V, D] with `vocab_major`), and so
    are the chunk's logits ("logits": [B, c, V]), whose rows are gathered over the axes that
    split the vocabulary and stay split over the other batch axes.

    Without it, FSDP's rows-split propagation gathers the whole output layer onto every chip and
    every chip builds a whole float32 gradient of it, per use inside the chunk loop: 8.0 GB of
    temporaries on a 4-layer Llama-3.1-8B DPO step (v5e-16, 8 microbatches) against 3.0 GB with
    it, and 10% fewer XLA FLOPs; a chunk's hidden rows are small beside a [D, V] weight. The
    hidden rows are left to propagation: pinning them as well (gathered) kept the memory and
    cost the 2-layer Gemma-2-9B GRPO iteration on v6e-16 39% more XLA FLOPs. A no-op without a
    mesh; with a vocabulary that no such axis divides, the rows stay split.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    (vocab,) = _pinned(jax.ShapeDtypeStruct((vocab_size,), x.dtype), (VOCAB_AXES,), mesh)
    vocab = () if vocab is None else (vocab,) if isinstance(vocab, str) else vocab
    rows = tuple(a for a in BATCH_AXES if a not in vocab)  # rows gathered over the vocab's axes
    if kind == "weight":
        dims = (VOCAB_AXES, None) if vocab_major else (None, VOCAB_AXES)
    elif kind == "logits":
        dims = (rows, None, VOCAB_AXES)
    else:
        raise ValueError(f"kind must be 'weight' or 'logits', got {kind!r}")
    return jax.lax.with_sharding_constraint(x, P(*_pinned(x, dims, mesh)))


def constrain_rows(tree: Any) -> Any:
    """`constrain(leaf, BATCH_AXES)` for every leaf with a leading (row) dim: rows split over the
    batch axes (see `constrain`)."""
    return jax.tree.map(lambda x: constrain(x, BATCH_AXES), tree)


def _batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    """Raises a ValueError, saying what to change, unless `batch_size` (global) splits evenly.

    Args:
      batch_size: the global batch size (all hosts together).
      mesh: the mesh from `make_mesh`; the batch is split over data x fsdp.
    """
    d, f = mesh.shape["data"], mesh.shape["fsdp"]
    if batch_size % (d * f):
        raise ValueError(
            f"batch size {batch_size} is not divisible by data x fsdp = {d} x {f} = {d * f}; "
            f"choose a batch size that is a multiple of {d * f} or change the mesh"
        )


# --------------------------------------------------------------------------------------------
# Parameter and state layouts


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: tuple) -> str:
    """A pytree key path as the '/'-joined names the partition rules match (`embed/embedding`)."""
    return "/".join(_key_name(k) for k in path)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...]) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in names)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh | None) -> P:
    """Aligns `spec` with the trailing dims of `shape` and drops axes that do not divide a dim."""
    if len(spec) > len(shape):
        return P()
    entries = [None] * (len(shape) - len(spec)) + list(spec)
    if mesh is not None:
        entries = [
            None if a is not None and dim % _axis_size(mesh, a) else a
            for a, dim in zip(entries, shape)
        ]
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _spec_for(path: str, shape: tuple[int, ...], mesh: Mesh | None) -> P:
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, path):
            return _fit_spec(spec, shape, mesh)
    return P()


def param_partition_specs(params: Any, mesh: Mesh | None = None) -> Any:
    """PartitionSpec of every leaf of `params` from `PARTITION_RULES` (first match wins).

    Works on any pytree with the decoder's parameter names (params, a whole train state, an optax
    state: the moments end with the same names as the params they mirror, so they get the same
    specs; counts and other scalars fall to the replicated default).
    Leaves may be arrays or ShapeDtypeStructs.

    Args:
      params: pytree of arrays / ShapeDtypeStructs.
      mesh: when given, a mesh axis that does not divide its dim is dropped (that dim replicated).
    Returns:
      A pytree of the same structure with a `PartitionSpec` per leaf.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _spec_for(path_str(path), tuple(np.shape(x)), mesh), params
    )


def state_shardings(mesh: Mesh, state: Any) -> Any:
    """NamedSharding of every leaf of a train state (params, opt_state, step, rng, frozen, ...).

    Args:
      mesh: the mesh.
      state: concrete or abstract (`jax.eval_shape`) state pytree.
    Returns:
      A pytree of `NamedSharding`s matching `state`.
    """
    specs = param_partition_specs(state, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Places a state (host or device arrays) on `mesh` per `state_shardings`, in fresh buffers.

    The copy goes through a jitted identity rather than `device_put`: a replicated `device_put`
    may reuse the caller's device buffer, which a donating step would then delete. In multi-host
    runs every process must pass the same values (e.g. the same init seed).
    """
    shardings = state_shardings(mesh, state)
    return jax.jit(lambda s: s, out_shardings=shardings)(state)


# --------------------------------------------------------------------------------------------
# Batches


def _local_batch_shards(mesh: Mesh) -> list[int]:
    """Sorted indices (over data x fsdp) of the batch shards held by this process's devices."""
    me = jax.process_index()
    d, f, _ = mesh.devices.shape
    return sorted(
        {
            i * f + j
            for i in range(d)
            for j in range(f)
            if any(dev.process_index == me for dev in mesh.devices[i, j])
        }
    )


def process_batch_rows(global_batch_size: int, mesh: Mesh) -> np.ndarray:
    """Rows of the global batch that this process must load, in the order `shard_batch` expects.

    On one process this is `arange(global_batch_size)`; with several, each host feeds its slice
    (the data loaders shard by these indices, or by `len(rows)` and the process index).

    Args:
      global_batch_size: batch size over all hosts (divisible by data x fsdp).
      mesh: the mesh.
    Returns:
      int64 array of global row indices.
    """
    check_batch_divisible(global_batch_size, mesh)
    per = global_batch_size // _batch_shards(mesh)
    return np.concatenate([np.arange(s * per, (s + 1) * per) for s in _local_batch_shards(mesh)])


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns this host's batch (numpy) into global arrays split per `batch_sharding(mesh)`.

    Single process: `batch` is the whole batch and is put on the devices. Multi-process: `batch`
    holds this process's rows (`process_batch_rows`) and the global arrays are assembled with
    `jax.make_array_from_process_local_data`; every leaf must have the batch as its leading dim.

    Args:
      batch: pytree of arrays [B_local, ...].
      mesh: the mesh.
    Returns:
      The same pytree of global `jax.Array`s [B, ...].
    """
    sharding = batch_sharding(mesh)
    local = len(_local_batch_shards(mesh))
    total = _batch_shards(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("every batch leaf needs a leading batch dim; got a scalar")
        if jax.process_count() == 1:
            check_batch_divisible(x.shape[0], mesh)
            return jax.device_put(x, sharding)
        if x.shape[0] % local:
            raise ValueError(
                f"batch leaf of shape {x.shape} on process {jax.process_index()}: its leading dim "
                f"(this process's rows) must split over the {local} batch shard(s) it holds"
            )
        global_shape = (x.shape[0] // local * total, *x.shape[1:])
        check_batch_divisible(global_shape[0], mesh)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, batch)


# --------------------------------------------------------------------------------------------
# The step compiler


def _abstract(x: Any, sharding: NamedSharding | None = None) -> jax.ShapeDtypeStruct:
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)


def compile_step(
    step_fn: Callable[[Any, Any], tuple[Any, Any]],
    mesh: Mesh,
    state: Any,
    batch: Any,
    *,
    donate_state: bool = True,
    batch_output: bool = False,
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Compiles `step(state, batch) -> (state, metrics)` for `mesh`, ahead of time.

    in_shardings are (`state_shardings`, `batch_sharding`; a batch leaf that is a scalar or
    whose leading dim does not split over data x fsdp is replicated), out_shardings are (the same
    state shardings, replicated metrics), and the state argument is donated. The result is an AOT
    `Compiled`: calling it with a state or batch of another shape, dtype or sharding raises
    instead of silently recompiling. Host numpy batches are accepted on one process; multi-host
    runs pass `shard_batch` output.

    Args:
      step_fn: pure step; anything static is closed over (functools.partial).
      mesh: the mesh.
      state: example state (concrete or ShapeDtypeStructs); only shapes and dtypes are read.
      batch: example GLOBAL batch (concrete or ShapeDtypeStructs), leading dim = batch.
      donate_state: donate the input state's buffers to the output state.
      batch_output: the second output is batch-like (e.g. a PPO rollout): its leaves whose
        leading dim splits over data x fsdp get `batch_sharding`, the rest stay replicated, so it
        can be fed to another compiled step as its batch.
    Returns:
      The compiled step, called as `state, metrics = compiled(state, batch)`.
    """
    state_sh = state_shardings(mesh, state)
    batch_sh = jax.tree.map(lambda x: _batch_or_replicated(x, mesh), batch)
    abstract_state = jax.tree.map(_abstract, state, state_sh)
    abstract_batch = jax.tree.map(_abstract, batch, batch_sh)
    with jax.set_mesh(mesh):
        out_sh: Any = replicated(mesh)
        if batch_output:
            _, aux = jax.eval_shape(step_fn, abstract_state, abstract_batch)
            out_sh = jax.tree.map(lambda x: _batch_or_replicated(x, mesh), aux)
        jitted = jax.jit(
            step_fn,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, out_sh),
            donate_argnums=(0,) if donate_state else (),
        )
        return jitted.lower(abstract_state, abstract_batch).compile()


def _batch_or_replicated(x: Any, mesh: Mesh) -> NamedSharding:
    shape = np.shape(x)
    if shape and shape[0] % _batch_shards(mesh) == 0:
        return batch_sharding(mesh)
    return replicated(mesh)
