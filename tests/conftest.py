"""Test configuration: 8 forced CPU devices for mesh tests, CPU only, float32 matmuls.

The environment variables must be set before jax is imported anywhere, so they live at the top
of the root conftest (pytest imports it before any test module); the shared fixtures below import
jax and the package inside their bodies.

Shared fixtures, each at the widest scope that is safe:
- `tiny(seed=0, **overrides)` (session): the tiny decoder of tests/helpers/tiny_lm.py as
  Tiny(config, model, params), built once per overrides and seed; `tiny_config`, `tiny_model`,
  `tiny_params` (session) are `tiny()`'s.
- `word_tokenizer`, `word_lm` (module): a word-level tokenizer and a tiny model on its vocabulary,
  for the hand-over, pairs, reference and task-loader tests.
- `tiny_sft_workdir` (session, one build shared by the xdist workers): the SFT driver's tiny
  preset run to the end; read-only for every test.
- `user_model_folder` (session): a researcher's own HF folder (tests/helpers/user_model.py), a
  tiny Qwen2 with a byte-level BPE tokenizer and ChatML template; read-only.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest

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


# ---------------------------------------------------------------------------------------------
# The tiny decoder of the step tests.


class Tiny(NamedTuple):
    """The tiny decoder with some overrides: its config, a `Transformer` of it, and its params
    from `jax.random.PRNGKey(seed)`."""

    config: Any
    model: Any
    params: dict


@pytest.fixture(scope="session")
def tiny():
    """`tiny(seed=0, **overrides)` -> Tiny for `helpers.tiny_lm.config(**overrides)`, built once
    per session (per xdist worker) for each seed and overrides: `tiny(n_layers=2)`,
    `tiny(seed=1).params` (another init of the same shapes).

    Session scope is safe: a config is a frozen dataclass, a Flax module holds no state and jax
    arrays are immutable. What a test must not do is donate these params to a step (copy them
    first, `jax.tree.map(jnp.copy, params)`) or assign into their dicts (copy the containers):
    the teardown fails the session when a shared param was deleted or changed.
    """
    import jax
    import numpy as np
    from helpers import tiny_lm

    from rlhf_jax.models import Transformer, init_params

    built: dict[tuple, tuple[Tiny, Any]] = {}

    def make(seed: int = 0, **overrides) -> Tiny:
        key = (seed, *sorted(overrides.items()))
        if key not in built:
            cfg = tiny_lm.config(**overrides)
            params = init_params(cfg, jax.random.PRNGKey(seed))
            built[key] = Tiny(cfg, Transformer(cfg), params), jax.tree.map(np.array, params)
        return built[key][0]

    yield make
    problems = []
    for (seed, *overrides), (shared, saved) in built.items():
        name = "tiny(" + ", ".join([f"seed={seed}", *(f"{k}={v!r}" for k, v in overrides)]) + ")"
        if jax.tree.structure(shared.params) != jax.tree.structure(saved):
            problems.append(f"the keys of {name}.params changed")
            continue
        for (path, leaf), want in zip(
            jax.tree_util.tree_leaves_with_path(shared.params), jax.tree.leaves(saved)
        ):
            where = f"{name}.params{jax.tree_util.keystr(path)}"
            if getattr(leaf, "is_deleted", lambda: False)():
                problems.append(f"{where} was donated")
            elif not np.array_equal(np.asarray(leaf), want):
                problems.append(f"{where} changed")
    assert not problems, "a test changed the shared tiny params: " + "; ".join(problems)


@pytest.fixture(scope="session")
def tiny_config(tiny):
    """The tiny config (1 layer, 2 heads, d_model 32, vocabulary 48, 32 positions)."""
    return tiny().config


@pytest.fixture(scope="session")
def tiny_model(tiny):
    """`Transformer(tiny_config)`."""
    return tiny().model


@pytest.fixture(scope="session")
def tiny_params(tiny):
    """`init_params(tiny_config, PRNGKey(0))`: never donate them, never assign into them."""
    return tiny().params


# ---------------------------------------------------------------------------------------------
# A word-level tokenizer and a tiny model on its vocabulary (hand-over, pairs, reference
# log-probs, task loaders). Module scope, as when test_runner.py held them: the tokenizer wraps
# a mutable backend and the params are host (NumPy, writable) arrays.


@pytest.fixture(scope="module")
def word_tokenizer():
    from helpers.run_inputs import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module")
def word_lm():
    """(config, host params): the "tiny" preset with a 32-token vocabulary and 32 positions."""
    import jax

    from rlhf_jax import models

    cfg = models.get_config("tiny", vocab_size=32, max_len=32, d_model=32)
    return cfg, jax.device_get(models.init_params(cfg, jax.random.PRNGKey(0)))


# ---------------------------------------------------------------------------------------------
# One tiny SFT run per test session.


class SftRun(NamedTuple):
    """A finished run of `experiments/sft.py argv`: its workdir and the rows `main` returned."""

    workdir: Path
    argv: list[str]
    rows: list[dict[str, Any]]


def _build_tiny_sft(root: Path) -> SftRun:
    """The SFT driver's tiny preset (60 steps) under `root/tiny_sft/run`, run unless a finished
    run is there (its rows saved beside it once `main` returned)."""
    from helpers import drivers

    folder = root / "tiny_sft"
    workdir, done = folder / "run", folder / "rows.json"
    argv = ["--preset", "tiny", "--workdir", str(workdir)]
    if done.is_file():
        return SftRun(workdir, argv, json.loads(done.read_text()))
    shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
    folder.mkdir(parents=True)
    rows = drivers.load("sft").main(argv)
    done.write_text(json.dumps(rows))
    return SftRun(workdir, argv, rows)


def _stat_tree(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file and folder under `root` (size -1 for a folder)."""
    out = {}
    for p in root.rglob("*"):
        st = p.stat()
        out[str(p.relative_to(root))] = (-1 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def tiny_sft_workdir(tmp_path_factory):
    """SftRun of `experiments/sft.py --preset tiny --workdir WORKDIR`, run once per test session:
    the --init-from of the driver tests (test_drivers.py, test_multihost_drivers.py).

    Under xdist the workers' base temporary folders share a parent: the first worker to take the
    lock there builds the run, the others wait and read it. Every test treats the workdir as
    read-only (a test that reruns or resumes the run copies it first); the teardown fails the
    session when a file or folder in it was written, added or removed.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: pytest caches it
        run = _build_tiny_sft(tmp_path_factory.getbasetemp())
    else:
        from filelock import FileLock

        root = tmp_path_factory.getbasetemp().parent
        with FileLock(str(root / "tiny_sft.lock")):
            run = _build_tiny_sft(root)
    before = _stat_tree(run.workdir)
    yield run
    after = _stat_tree(run.workdir)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared {run.workdir} (copy it first): {changed}"


# ---------------------------------------------------------------------------------------------
# A researcher's own model folder (tests/helpers/user_model.py): a tiny Qwen2 with a byte-level
# BPE tokenizer and a ChatML template, saved by transformers.


@pytest.fixture(scope="session")
def user_model_folder(tmp_path_factory):
    """The folder of `helpers.user_model.build` (once per session and xdist worker): read-only
    for every test (copy it to change a file)."""
    from helpers import user_model

    return user_model.build(tmp_path_factory.mktemp("user_model") / "model")
