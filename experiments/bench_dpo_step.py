"""Tokens/s of our compiled DPO step vs a PyTorch + transformers DPO step, same model and batch.

    .venv/bin/python experiments/bench_dpo_step.py        # CPU default, about 1 min on 2 idle cores
    .venv/bin/python experiments/bench_dpo_step.py --shape gpt2-large --seq-len 512 --dtype bfloat16
(GPU rows; also `--shape gpt2-medium`, `--shape llama-3.2-1b` or any preset of another family;
`--device auto` picks cuda when JAX and PyTorch see a GPU; `--device cuda` forces it)

Both sides train the same randomly initialised policy of the chosen shape and family (built with
`init_params`, exported with `save_pretrained`, loaded by transformers' `AutoModelForCausalLM`:
`GPT2LMHeadModel`, `LlamaForCausalLM`, ...; dropout off) against a frozen copy
as reference, on the same right-padded batch of `pairs` random preference pairs (shared prompt of
T/4..T/2 tokens masked out of the loss, responses of random length, padding to T):

- ours: `make_dpo_step` (sigmoid DPO) compiled by `rlhf_jax.sharding.compile_step` on one device,
  state donated: one policy forward+backward on chosen and rejected concatenated, the reference
  forward from `state.frozen` inside the step (not precomputed log-probs), global-norm clipping
  and AdamW (`make_optimizer`);
- PyTorch: the matching transformers model's policy forward+backward on chosen and rejected
  concatenated, the reference forward under `torch.no_grad()`, the same log-prob gathering and
  sigmoid DPO loss, `clip_grad_norm_` and `torch.optim.AdamW` (eager; autocast bf16 on cuda with
  `--dtype bfloat16`; our side then computes in bf16 with float32 params).

Warm-up (compilation, first steps) is excluded. The timed steps run in `rounds` interleaved blocks
(ours, then PyTorch, `iters` steps each, each step synchronised: `block_until_ready` /
`torch.cuda.synchronize`) so that a load change on a shared machine hits both sides alike; the
printed time is the median step time over all blocks. Tokens per step = 2 · pairs · seq_len.

Model FLOPs per step (PaLM appendix B convention, causal attention counted as full):
    tokens · (6 N + 12 L T H Dh)    trained policy (forward + backward)
  + tokens · (2 N + 4 L T H Dh)     reference forward
with N = `TransformerConfig.matmul_params()` the parameters that enter matmuls (attention and MLP
projections and the output layer; GPT-2: L (4 D² + 2 D F) + V D; embeddings, biases and norms
excluded), L layers, H·Dh the query width (D for GPT-2), T seq_len. MFU = FLOP/s / peak; the
peak is known for H100/H200 in bfloat16 (989 TFLOP/s dense) or given with `--peak-tflops`;
otherwise n/a.

With `--roofline` (default) it also times the step's largest matmul, [2·pairs·seq_len, D] x [D,
F], alone with each library and prints the step's model FLOPs at the faster rate: the matmul-bound
ceiling of this device, which no implementation of the step beats.

Prints, for each side, tokens/s of the median step (the result) and of the best step, ms per
median step, model TFLOP/s and MFU, and the process CPU ms per step (all threads); then the ratio
ours / PyTorch and a check that both sides computed the same policy log-probs on the first step.
On a shared CPU machine run it when the load is low: both sides use every core, and an
oversubscribed machine slows PyTorch's spinning OpenMP threads far more than XLA's (the CPU ms
column shows it), which inflates the median ratio; the best-step ratio is the less noisy one.
"""

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Literal

# Let JAX and PyTorch share one GPU: allocate on demand instead of grabbing 75 % of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from roofline import gemm_tflops  # noqa: E402  (experiments/roofline.py)

from rlhf_jax import models, sharding, train  # noqa: E402

# Shapes: "cpu" is the CPU default (4 layers x 256 wide, 4 heads, vocab 1024; "llama-cpu" is the
# same size Llama-shaped); the others are the model presets of every family (GPT-2 sizes, and
# the published shapes: llama-3.2-1b, qwen2.5-0.5b, gemma-2-2b, ...). A learned-position model's
# max_len is raised to seq_len when needed.
SHAPES: dict[str, dict] = {
    "cpu": dict(vocab_size=1024, max_len=128, d_model=256, n_layers=4, n_heads=4),
    **models.PRESETS,
}
ShapeName = Literal[tuple(SHAPES)]  # type: ignore[valid-type]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM


@dataclasses.dataclass(frozen=True)
class Config:
    """DPO step throughput: ours (JAX) vs PyTorch + transformers on the same model and batch (see
    the docstring of experiments/bench_dpo_step.py for what each side runs and the FLOP count)."""

    shape: ShapeName = "cpu"  # "cpu", or a models.PRESETS name of any family
    n_layers: int | None = None  # override the shape's number of layers
    pairs: int = 8  # preference pairs per step (the step sees 2 * pairs sequences)
    seq_len: int = 128
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params always float32
    # Our attention kernel: auto = cuDNN flash attention on a GPU in bfloat16, else XLA's.
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when JAX and torch see a GPU
    sides: Literal["both", "jax", "torch"] = "both"
    warmup: int = 2  # untimed steps per side (ours: after compilation)
    iters: int = 5  # timed steps per side and round
    rounds: int = 3  # interleaved timing blocks (ours, then PyTorch)
    beta: float = 0.1
    learning_rate: float = 1e-5
    max_grad_norm: float = 1.0  # global-norm clipping on both sides
    seed: int = 0
    peak_tflops: float | None = None  # per-device peak for MFU; default: known GPUs in bf16
    roofline: bool = True  # also time the step's largest matmul alone (the matmul-bound ceiling)


def model_config(config: Config, device: str = "cpu") -> models.TransformerConfig:
    """The config of `config.shape` (any family), with room for `seq_len` positions, and our
    attention kernel for `device` ("cpu" or "cuda")."""
    base = SHAPES[config.shape]
    attention = config.attention
    if attention == "auto":
        attention = "cudnn" if device == "cuda" and config.dtype == "bfloat16" else "xla"
    overrides = {
        "max_len": max(base.get("max_len", 1024), config.seq_len),
        "dtype": config.dtype,
        "attention": attention,
    }
    if config.n_layers is not None:
        overrides["n_layers"] = config.n_layers
    return models.TransformerConfig(**{**base, **overrides})


def make_batch(config: Config, vocab_size: int) -> dict[str, np.ndarray]:
    """Right-padded random preference pairs: a shared prompt of T/4..T/2 tokens (not in the loss
    mask), a response per side ending at a random length in [3T/4, T], pad id 0 after it."""
    rs = np.random.default_rng(config.seed)
    b, t = config.pairs, config.seq_len
    prompt_len = rs.integers(t // 4, t // 2 + 1, size=b)  # [B]
    prompt = rs.integers(1, vocab_size, size=(b, t))  # [B, T]
    pos = np.arange(t)[None]  # [1, T]
    batch = {}
    for side in ("chosen", "rejected"):
        length = rs.integers(max(3 * t // 4, t // 2 + 2), t + 1, size=b)  # [B]
        response = rs.integers(1, vocab_size, size=(b, t))  # [B, T]
        tokens = np.where(pos < prompt_len[:, None], prompt, response)
        attn = pos < length[:, None]  # [B, T]
        batch[f"{side}_tokens"] = np.where(attn, tokens, 0).astype(np.int32)
        batch[f"{side}_attention_mask"] = attn.astype(np.int32)
        batch[f"{side}_loss_mask"] = (attn & (pos >= prompt_len[:, None])).astype(np.int32)
    return batch


def model_flops_per_step(cfg: models.TransformerConfig, tokens: int, seq_len: int) -> float:
    """tokens · (8 N + 16 L T H Dh): policy forward+backward (6N + 12 L T H Dh) + reference
    forward (2N + 4 L T H Dh), N = `cfg.matmul_params()`."""
    return tokens * (cfg.flops_per_token(seq_len) + cfg.flops_per_token(seq_len, backward=False))


def _peak_tflops(config: Config, device_name: str) -> float | None:
    if config.peak_tflops is not None:
        return config.peak_tflops
    if config.dtype != "bfloat16":
        return None
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


# --------------------------------------------------------------------------------------------
# Our side


def make_jax_side(config: Config, cfg: models.TransformerConfig, params, batch, device):
    """Returns `run(n) -> [(wall s, process CPU s)] per step`, `first_logps() -> (chosen,
    rejected)` of the first step, and the compile time."""
    optimizer = train.make_optimizer(config.learning_rate, max_grad_norm=config.max_grad_norm)
    ref = jax.tree.map(lambda x: np.array(x, copy=True), params)
    state = train.create_train_state(
        params, optimizer, config.seed, frozen=ref, hparams={"beta": config.beta}
    )
    mesh = sharding.make_mesh(1, 1, 1, devices=[device])
    state = sharding.shard_state(state, mesh)
    dev_batch = sharding.shard_batch(batch, mesh)
    step = train.make_dpo_step(models.Transformer(cfg), optimizer, loss_type="sigmoid")
    t0 = time.perf_counter()
    compiled = sharding.compile_step(step, mesh, state, dev_batch)
    compile_s = time.perf_counter() - t0
    box = {"state": state, "first": None}

    def run(n: int) -> list[tuple[float, float]]:
        times = []
        for _ in range(n):
            t, c = time.perf_counter(), time.process_time()
            box["state"], metrics = compiled(box["state"], dev_batch)
            jax.block_until_ready((box["state"], metrics))
            times.append((time.perf_counter() - t, time.process_time() - c))
            if box["first"] is None:
                box["first"] = (float(metrics["logps/chosen"]), float(metrics["logps/rejected"]))
        return times

    return run, lambda: box["first"], compile_s


# --------------------------------------------------------------------------------------------
# PyTorch side


def make_torch_side(config: Config, model_dir: str, batch, device: str):
    """The plain PyTorch + transformers DPO step (what TRL's DPOTrainer does per step, minus the
    Trainer): returns `run(n)` and `first_logps()` like `make_jax_side`."""
    import contextlib
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_config = AutoConfig.from_pretrained(model_dir)
    no_dropout = {  # GPT-2's dropouts default to 0.1; the other families' to 0
        k: 0.0
        for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout")
        if hasattr(hf_config, k)
    }
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **no_dropout)
    reference = copy.deepcopy(policy)
    policy.to(device).train()
    reference.to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=0.0)

    def cat(name: str) -> torch.Tensor:
        x = np.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]])
        return torch.from_numpy(x).long().to(device)

    tokens, attn, loss_mask = cat("tokens"), cat("attention_mask"), cat("loss_mask")
    targets, mask = tokens[:, 1:].unsqueeze(-1), loss_mask[:, 1:].bool()  # [2B, T-1]
    b = config.pairs
    if config.dtype == "bfloat16":
        autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def seq_logps(model) -> torch.Tensor:
        with autocast():
            logits = model(input_ids=tokens, attention_mask=attn).logits[:, :-1]
        logits = logits.float()  # log-softmax in float32
        tlp = torch.gather(logits, -1, targets).squeeze(-1) - torch.logsumexp(logits, -1)
        return torch.where(mask, tlp, 0.0).sum(-1)  # [2B]

    first = []

    def step() -> None:
        with torch.no_grad():
            ref_lp = seq_logps(reference)
        lp = seq_logps(policy)
        h = (lp[:b] - ref_lp[:b]) - (lp[b:] - ref_lp[b:])
        loss = -F.logsigmoid(config.beta * h).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        opt.step()
        if not first:
            first.append((lp[:b].mean().item(), lp[b:].mean().item()))

    def run(n: int) -> list[tuple[float, float]]:
        times = []
        for _ in range(n):
            sync()
            t, c = time.perf_counter(), time.process_time()
            step()
            sync()
            times.append((time.perf_counter() - t, time.process_time() - c))
        return times

    return run, lambda: first[0] if first else None


# --------------------------------------------------------------------------------------------


def _resolve_device(config: Config) -> str:
    """The device both sides run on: `config.device`, or for "auto" cuda when JAX has a GPU
    (and PyTorch sees one too, if it runs), else cpu."""
    if config.device != "auto":
        return config.device
    if jax.default_backend() != "gpu":
        return "cpu"
    if config.sides == "jax":
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _jax_device(device: str):
    try:
        return jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except RuntimeError as e:
        raise SystemExit(f"--device {device}: JAX has no such backend here ({e})") from None


def main(config: Config) -> dict:
    """Runs the benchmark and prints the table; returns the numbers (for tests and notebooks)."""
    device = _resolve_device(config)
    jax_device = _jax_device(device)
    cfg = model_config(config, device)
    params = models.init_params(cfg, jax.random.PRNGKey(config.seed))
    params = jax.tree.map(np.asarray, params)
    batch = make_batch(config, cfg.vocab_size)
    tokens = 2 * config.pairs * config.seq_len
    flops = model_flops_per_step(cfg, tokens, config.seq_len)

    runners = {}
    if config.sides in ("both", "torch"):
        import torch

        if device == "cpu":
            torch.set_num_threads(os.cpu_count())
        with tempfile.TemporaryDirectory() as model_dir:
            models.save_pretrained(model_dir, cfg, params)
            runners["torch"] = make_torch_side(config, model_dir, batch, device)
        torch_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(f"torch {torch.__version__} on {torch_name}, {torch.get_num_threads()} threads")
    if config.sides in ("both", "jax"):
        run, first, compile_s = make_jax_side(config, cfg, params, batch, jax_device)
        runners["jax"] = (run, first)
        print(
            f"jax {jax.__version__} on {jax_device.device_kind} ({jax_device.platform}), "
            f"{os.cpu_count()} cores visible; step compiled in {compile_s:.1f} s"
        )

    device_name = jax_device.device_kind if device == "cuda" else "cpu"
    peak = _peak_tflops(config, device_name)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"model {config.shape}: L={cfg.n_layers} D={cfg.d_model} H={cfg.n_heads} "
        f"V={cfg.vocab_size} ({n_params / 1e6:.1f}M params), {config.dtype}, our attention "
        f"{cfg.attention}; batch "
        f"{config.pairs} pairs x {config.seq_len} tokens = {tokens} tokens/step; "
        f"{flops / 1e12:.3f} model TFLOP/step"
    )

    order = [s for s in ("jax", "torch") if s in runners]
    for side in order:
        runners[side][0](config.warmup)
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in order}
    for _ in range(config.rounds):
        for side in order:
            times[side].extend(runners[side][0](config.iters))

    results: dict = {"config": dataclasses.asdict(config), "device": device_name}
    if config.roofline:
        # Both sides' largest matmul: [2 * pairs * seq_len, D] x [D, d_ff] (the MLP input layer).
        sides = tuple(s for s in ("jax", "torch") if s in runners)
        rates = gemm_tflops(tokens, cfg.d_model, cfg.d_ff, config.dtype, jax_device, sides)
        results["gemm_tflops"] = rates
        results["matmul_bound_s"] = flops / (max(rates.values()) * 1e12)
    header = (
        f"{'side':<7}{'tokens/s':>10}{'best':>8}{'ms/step':>9}{'TFLOP/s':>9}{'MFU':>7}{'cpu ms':>8}"
    )
    print(f"{header}   wall ms of each timed step")
    for side in order:
        sec = statistics.median(t for t, _ in times[side])
        best = min(t for t, _ in times[side])
        cpu = statistics.median(c for _, c in times[side])
        tflops = flops / sec / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        name = "ours" if side == "jax" else "torch"
        all_ms = " ".join(f"{1e3 * t:.0f}" for t, _ in times[side])
        print(
            f"{name:<7}{tokens / sec:>10.0f}{tokens / best:>8.0f}{1e3 * sec:>9.1f}{tflops:>9.3f}"
            f"{mfu:>7}{1e3 * cpu:>8.0f}   {all_ms}"
        )
        results[side] = {
            "tokens_per_s": tokens / sec,
            "best_tokens_per_s": tokens / best,
            "step_s": sec,
            "cpu_s": cpu,
            "tflops": tflops,
            "mfu": tflops / peak if peak else None,
            "step_times": [t for t, _ in times[side]],
            "first_logps": runners[side][1](),
        }
    if config.roofline:
        rates, bound = results["gemm_tflops"], results["matmul_bound_s"]
        print(
            f"matmul alone [{tokens}x{cfg.d_model}]x[{cfg.d_model}x{cfg.d_ff}] {config.dtype}: "
            + ", ".join(f"{'ours' if k == 'jax' else k} {v:.3f} TFLOP/s" for k, v in rates.items())
            + f"; the step's model FLOPs at the faster rate take {1e3 * bound:.1f} ms, i.e. "
            f"{tokens / bound:.0f} tokens/s at most"
            + (
                f" = {results['torch']['step_s'] / bound:.2f}x the PyTorch median step"
                if "torch" in results
                else ""
            )
        )
    if len(order) == 2:
        ratio = results["jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        ratio_best = results["jax"]["best_tokens_per_s"] / results["torch"]["best_tokens_per_s"]
        results["ratio"], results["ratio_best"] = ratio, ratio_best
        print(f"ratio ours / torch: {ratio:.2f}x (median steps), {ratio_best:.2f}x (best steps)")
        (jc, jr), (tc, tr) = results["jax"]["first_logps"], results["torch"]["first_logps"]
        diff = max(abs(jc - tc), abs(jr - tr)) / max(abs(tc), abs(tr))
        results["logps_rel_diff"] = diff
        print(
            f"check, first-step policy log-probs (mean over pairs): ours {jc:.3f}/{jr:.3f}, "
            f"torch {tc:.3f}/{tr:.3f} (chosen/rejected), relative difference {diff:.1e}"
        )
    return results


if __name__ == "__main__":
    main(tyro.cli(Config))
