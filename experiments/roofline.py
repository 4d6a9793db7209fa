"""The matmul-bound ceiling of a benchmark: how fast this device multiplies matrices alone.

Used by bench_dpo_step.py and bench_generate.py (`--roofline`, on by default): a step whose model
FLOPs all ran at the rate of its own matmul shape, measured alone, is the fastest any
implementation of it can be on this device; its ratio to the PyTorch side is the largest speed-up
that is there to win.
"""

import time

import jax
import jax.numpy as jnp


def gemm_tflops(m: int, k: int, n: int, dtype: str, jax_device, sides=("jax", "torch")):
    """TFLOP/s of one [m, k] x [k, n] matmul alone, best of 5 timed blocks, by JAX and PyTorch.

    The faster of the two is what this device does on the step's own matmul shape; a step whose
    model FLOPs all ran at that rate would take `flops / rate`: no implementation beats it.
    """
    rates = {}
    target = 0.2  # seconds per timed block
    if "jax" in sides:
        a = jax.device_put(jnp.ones((m, k), dtype), jax_device)
        b = jax.device_put(jnp.ones((k, n), dtype), jax_device)
        mm = jax.jit(lambda x, y: x @ y)
        jax.block_until_ready(mm(a, b))
        t = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        reps = max(1, int(target / max(time.perf_counter() - t, 1e-6)))
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            out = [mm(a, b) for _ in range(reps)]
            jax.block_until_ready(out)
            best = min(best, (time.perf_counter() - t) / reps)
        rates["jax"] = 2.0 * m * k * n / best / 1e12
    if "torch" in sides:
        import torch

        device = "cuda" if jax_device.platform == "gpu" else "cpu"
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        a = torch.ones(m, k, dtype=tdtype, device=device)
        b = torch.ones(k, n, dtype=tdtype, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.no_grad():
            a @ b
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            reps = max(1, int(target / max(time.perf_counter() - t, 1e-6)))
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(reps):
                    a @ b
                sync()
                best = min(best, (time.perf_counter() - t) / reps)
        rates["torch"] = 2.0 * m * k * n / best / 1e12
    return rates
