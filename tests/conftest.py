"""Test configuration: 8 forced CPU devices for mesh tests, CPU only, float32 matmuls.

The environment variables must be set before jax is imported anywhere, so they live at the top
of the root conftest (pytest imports it before any test module).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny: compiling them costs far more than running them, and LLVM's
# optimisation passes are most of XLA:CPU's compile time (-O0 cuts a compile-bound test by about
# a quarter). Only the machine code changes, not the HLO or its numerics. Test processes only;
# subprocesses inherit it, and a test that sets its own XLA_FLAGS keeps it (TEST_XLA_FLAGS).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in _flags:
    _flags += " " + TEST_XLA_FLAGS
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One XLA compilation cache per test session, shared by both xdist workers and every subprocess
# (drivers, multi-host runs, relaunches after a kill): the same tiny programs are compiled by
# many tests, and a relaunch reads back what the killed run compiled. It starts empty, so a CI
# run measures what a fresh clone pays; the session that made it removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="rlhf_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
