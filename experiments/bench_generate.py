"""Benchmark: new tokens per second of `rlhf_jax.sampling.generate` vs transformers' `generate`.

    python experiments/bench_generate.py            # CPU default: "small" (4 layers x 256), B=32
    python experiments/bench_generate.py --threads 1   # both single-threaded (a shared CPU box)
    python experiments/bench_generate.py --shape gpt2-medium --batch 64 --new-tokens 128 \
        --dtype bfloat16                            # a GPU (also --shape llama-3.2-1b, ...)
    python experiments/bench_generate.py --shape llama-cpu   # a Llama-shaped CPU row

Both run the same randomly initialised model of any family (our params exported with
`save_pretrained` and loaded by transformers' `AutoModelForCausalLM`: `GPT2LMHeadModel`,
`LlamaForCausalLM`, ...), the same unpadded prompts [batch, prompt_len] and
exactly `new_tokens` new tokens per row (no EOS), sampling at temperature 1 without truncation
(`--greedy` for argmax). Compilation / warm-up is excluded; each figure is the median of
`--repeats` timed runs. Prints one row per implementation (new tokens per wall-clock second and
process CPU seconds per run) and the ratio; with `--roofline` (default) also the matmul-bound
ceiling: the run's model FLOPs at the rate of its prefill and decode matmul shapes timed alone.
On a CPU shared with other jobs, multi-threaded PyTorch degrades far more than XLA (its threads
spin), so compare with `--threads 1` there.
"""

import dataclasses
import os
import resource
import statistics
import tempfile
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from roofline import gemm_tflops  # experiments/roofline.py

from rlhf_jax.models import Transformer, get_config, init_params, save_pretrained
from rlhf_jax.sampling import generate


@dataclasses.dataclass(frozen=True)
class Args:
    shape: str = "small"  # a preset of rlhf_jax.models.PRESETS, of any family
    batch: int = 32
    prompt_len: int = 32
    new_tokens: int = 64
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of both implementations
    greedy: bool = False
    repeats: int = 3
    seed: int = 0
    threads: int | None = None  # CPU threads of both (default: each library's own default)
    skip_transformers: bool = False
    roofline: bool = True  # also time the decode and prefill matmul shapes alone (the ceiling)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of `repeats` calls after a warm-up."""
    fn()  # warm-up: compilation / allocator caches
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(_cpu_seconds() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def bench_ours(args: Args, config, params, prompts: np.ndarray) -> tuple[float, float]:
    model = Transformer(config)
    static = ("model", "max_new_tokens", "top_k", "eos_id", "pad_id")
    run = jax.jit(generate, static_argnames=static)
    prompts, mask = jnp.asarray(prompts), jnp.ones(prompts.shape, jnp.int32)
    temperature = 0.0 if args.greedy else 1.0
    keys = iter(jax.random.split(jax.random.key(args.seed), args.repeats + 1))

    def once():
        out = run(model, params, prompts, mask, next(keys), max_new_tokens=args.new_tokens,
                  temperature=temperature)  # fmt: skip
        jax.block_until_ready(out.tokens)

    return _timed(once, args.repeats)


def bench_transformers(args: Args, config, params, prompts: np.ndarray) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    with tempfile.TemporaryDirectory() as path:
        save_pretrained(path, config, params)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    gen_config = GenerationConfig(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        do_sample=not args.greedy, temperature=1.0, top_k=0, top_p=1.0,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    input_ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)

    def once():
        with torch.inference_mode():
            out = model.generate(
                input_ids, attention_mask=attention_mask, generation_config=gen_config
            )
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape
        if device == "cuda":
            torch.cuda.synchronize()

    return _timed(once, args.repeats)


def matmul_bound(args: Args, config, sides) -> dict:
    """Seconds a generate run would take if its model FLOPs ran at the rate of its matmul shapes
    measured alone: the prefill ([batch * prompt_len, D] x [D, F]) and the decode steps ([batch,
    D] x [D, F], one per new token after the first). Attention is left out (a lower bound)."""
    d, f, v = config.d_model, config.d_ff, config.vocab_size
    blocks = config.matmul_params() - v * d  # matmul params per token of the blocks
    device = jax.devices()[0]
    big = gemm_tflops(args.batch * args.prompt_len, d, f, args.dtype, device, sides)
    small = gemm_tflops(args.batch, d, f, args.dtype, device, sides)
    prefill = 2.0 * args.batch * (args.prompt_len * blocks + v * d)  # head on the last token
    decode = 2.0 * args.batch * (args.new_tokens - 1) * (blocks + v * d)
    seconds = prefill / (max(big.values()) * 1e12) + decode / (max(small.values()) * 1e12)
    return {"prefill_tflops": big, "decode_tflops": small, "seconds": seconds}


def main(args: Args) -> dict:
    if args.threads:  # read when the XLA backend starts, i.e. before the first computation below
        flags = f"--xla_cpu_multi_thread_eigen={args.threads > 1} "
        flags += f"intra_op_parallelism_threads={args.threads}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    config = get_config(args.shape, dtype=args.dtype)
    params = init_params(config, jax.random.key(args.seed))
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, config.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    new = args.batch * args.new_tokens
    mode = "greedy" if args.greedy else "sampling"
    print(
        f"{args.shape} ({config.family}, L={config.n_layers}, D={config.d_model}, "
        f"H={config.n_heads}/{config.n_kv_heads} kv, V={config.vocab_size}) "
        f"{args.dtype} batch={args.batch} prompt={args.prompt_len} new={args.new_tokens} {mode} "
        f"threads={args.threads or 'default'}; jax {jax.__version__} on {jax.devices()[0]}"
    )
    wall, cpu = bench_ours(args, config, params, prompts)
    ours = new / wall
    results = {"ours": ours}
    print(f"rlhf_jax      {ours:10.0f} new tokens/s   ({cpu:.2f} CPU-s per run)")
    if not args.skip_transformers:
        wall, cpu = bench_transformers(args, config, params, prompts)
        theirs = new / wall
        results.update(transformers=theirs, ratio=ours / theirs)
        print(f"transformers  {theirs:10.0f} new tokens/s   ({cpu:.2f} CPU-s per run)")
        print(f"ratio         {ours / theirs:10.2f}x")
    if args.roofline:
        sides = ("jax",) if args.skip_transformers else ("jax", "torch")
        bound = results["matmul_bound"] = matmul_bound(args, config, sides)

        def show(rates):
            return ", ".join(f"{'ours' if k == 'jax' else k} {r:.3f}" for k, r in rates.items())

        line = (
            f"matmuls alone (TFLOP/s): prefill {show(bound['prefill_tflops'])}; decode "
            f"{show(bound['decode_tflops'])}; at the faster rates a run takes "
            f"{1e3 * bound['seconds']:.0f} ms, i.e. "
            f"{new / bound['seconds']:.0f} new tokens/s at most"
        )
        if "transformers" in results:
            line += f" = {new / bound['seconds'] / results['transformers']:.2f}x transformers"
        print(line)
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
