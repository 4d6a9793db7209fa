"""The real drivers on 4 local processes (2 forced CPU devices each) joined by `jax.distributed`
on 127.0.0.1, launched as a user launches them on a pod (`--coordinator-address --num-processes
--process-id`), on the mesh data=2,fsdp=4 (batch and parameters split across the hosts), against
the same command in one process with 8 devices:

- DPO (experiments/dpo.py --init-from a tiny SFT run, 6 steps, a checkpoint every 2): metrics and
  hand-over weights (hf/model.safetensors) equal the single-process run's to 1e-5.
- Only process 0 writes shared files: an audit hook (`sys.addaudithook`, installed by
  tests/helpers/multihost_sitecustomize.py as the workers' sitecustomize) logs every file-system
  change each process makes under the workdir into a log outside it; processes 1-3 change nothing
  outside checkpoints/ (where Orbax has each host write its own shards), process 0 writes
  run_config.json, pairs.jsonl, metrics.jsonl, tensorboard/, model_config.json and hf/.
- A dead peer: SIGKILL of process 2 once checkpoints/2 exists makes the 3 others exit non-zero
  within the heartbeat timeout (--heartbeat-timeout-s 5) + 30 s, each printing jax's
  "Terminating process because the JAX distributed service detected fatal errors" and a status
  naming the lost heartbeat; the same 4 commands resume from step 2; SIGKILL of all 4 once
  checkpoints/4 exists (a preempted pod); the same 4 commands again resume from step 4, and the
  final metrics.jsonl rows equal (==) the uninterrupted 4-process run's, each step once.
- PPO with the ground-truth reward (the host-reward path: each host decodes and scores its own
  rollout rows) and GRPO on a dataset with a Python reward that reads a column (`--dataset
  --reward-fn`: each host scores its own rows, the per-reward means are over all hosts' rows,
  and completions.jsonl holds every host's rows): one iteration each, equal to one process to
  1e-5; both write the same completion samples (greedy, on the sharded policy).

The SFT run is the session's `tiny_sft_workdir` (conftest, shared with test_drivers.py); the
single-process references and the uninterrupted DPO run are module fixtures. Every subprocess
runs under a timeout and every process of a launch is killed when the test fails, so nothing
hangs. The workers share compiled programs through the session's compilation cache (see the
sitecustomize: process 0 compiles, the others load).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax.run.metrics_writer import read_metrics

pytestmark = pytest.mark.slow  # four jax.distributed processes per run

REPO = Path(__file__).resolve().parents[1]
SITECUSTOMIZE = Path(__file__).parent / "helpers" / "multihost_sitecustomize.py"
NUM_PROCESSES = 4
DEVICES_PER_PROCESS = 2
MESH = "data=2,fsdp=4"  # fsdp spans two hosts: parameters are split across processes
TIMEOUT_S = 300  # one launch: 4 processes compile and run on a shared 2-core machine
HEARTBEAT_S = 5  # --heartbeat-timeout-s of the 4-process runs
DEAD_PEER_S = HEARTBEAT_S + 30  # the bound on the survivors' exit after a SIGKILL
TOL = 1e-5
# What every survivor of a dead peer prints (jax's coordination service), then the status, which
# names the heartbeat: "The following tasks are unhealthy (stopped sending heartbeats): 2" or
# "Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 2 heartbeat timeout".
DEAD_PEER_MESSAGES = (
    "Terminating process because the JAX distributed service detected fatal errors",
    "heartbeat",
)
DPO = (
    "--mesh", MESH, "--steps", "6", "--warmup-steps", "1", "--checkpoint-every", "2",
    "--log-every", "1", "--num-prompts", "16", "--batch-size", "8",
)  # fmt: skip
PPO = (
    "--reward", "ground-truth", "--mesh", MESH, "--steps", "1", "--batch-size", "8",
    "--log-every", "1", "--checkpoint-every", "1",
)  # fmt: skip
GRPO = (
    "--reward-fn", str(Path(__file__).parent / "helpers" / "review_rewards.py") + ":mentions",
    "--algo", "grpo", "--mesh", MESH, "--steps", "1", "--prompts-per-step", "8",
    "--group-size", "4", "--log-every", "1", "--checkpoint-every", "1", "--max-new-tokens", "12",
)  # fmt: skip
REVIEWS = ["The film was", "The acting felt", "The plot", "The ending was", "The cast",
           "The music", "The story was", "The script"]  # fmt: skip


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, pythonpath):
    """This session's environment (its compilation cache included) for a driver subprocess."""
    env = dict(os.environ)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(var, None)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={devices}"
            " --xla_backend_optimization_level=0"  # compile faster; same float32 numerics
        ),
        PYTHONPATH=os.pathsep.join(map(str, pythonpath)),
    )
    return env


def _tail(path, n=4000):
    return Path(path).read_text(errors="replace")[-n:] if Path(path).exists() else "(no log)"


def _command(script, args, workdir):
    return [sys.executable, str(REPO / "experiments" / script), "--preset", "tiny", *args,
            "--workdir", str(workdir)]  # fmt: skip


@contextlib.contextmanager
def _single(script, args, workdir):
    """Starts the command in one process with 8 devices (output in `<workdir>.log`); yields a
    function that waits for it (at most TIMEOUT_S) and returns its metrics rows. The process is
    killed if still running on exit."""
    log = workdir.parent / f"{workdir.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            _command(script, args, workdir), env=_env(8, [REPO]), cwd=REPO, stdout=f,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def result():
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{script} (1 process) still running after {TIMEOUT_S} s:\n{_tail(log)}")
        assert code == 0, f"{script} (1 process) failed (rc {code}):\n{_tail(log)}"
        return read_metrics(workdir)

    try:
        yield result
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _run_both(script, args, one, four, site):
    """The command in one process (in the background: it compiles while the 4 processes start
    and wait for each other) and on 4 processes; returns both runs' metrics rows."""
    with _single(script, args, one) as single:
        got = _run_multi(script, args, four, site)
        return single(), got


@contextlib.contextmanager
def _launch(script, args, workdir, site):
    """Starts the 4 processes of a run (stdout+stderr and the write audit of process i in
    `<workdir>.launch<n>/log_i.txt` and `audit_i.jsonl`, n counting this workdir's launches);
    kills every one still running on exit."""
    out = workdir.parent / f"{workdir.name}.launch{len(_launches(workdir))}"
    out.mkdir(parents=True)
    port = _free_port()
    procs = []
    try:
        for i in range(NUM_PROCESSES):
            env = _env(DEVICES_PER_PROCESS, [site, REPO])
            env.update(
                MULTIHOST_AUDIT_LOG=str(out / f"audit_{i}.jsonl"),
                MULTIHOST_AUDIT_ROOT=str(workdir),
                MULTIHOST_SHARE_COMPILED="1",
            )
            distributed = [
                "--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
                str(NUM_PROCESSES), "--process-id", str(i), "--heartbeat-timeout-s",
                str(HEARTBEAT_S),
            ]  # fmt: skip
            with open(out / f"log_{i}.txt", "w") as log:
                procs.append(
                    subprocess.Popen(
                        _command(script, args, workdir) + distributed,
                        env=env,
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield procs, out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()


def _wait(procs, out, timeout, what):
    """Waits for every process (at most `timeout` s in all); returns their exit codes and when
    each exited (seconds from now)."""
    start = time.monotonic()
    codes, times = [], []
    for i, proc in enumerate(procs):
        try:
            codes.append(proc.wait(timeout=max(0.1, start + timeout - time.monotonic())))
        except subprocess.TimeoutExpired:
            logs = "\n---\n".join(_tail(out / f"log_{j}.txt", 2000) for j in range(len(procs)))
            pytest.fail(f"{what}: process {i} still running after {timeout} s:\n{logs}")
        times.append(time.monotonic() - start)
    return codes, times


def _run_multi(script, args, workdir, site):
    """The command on 4 processes; every one must succeed. Returns the metrics rows."""
    with _launch(script, args, workdir, site) as (procs, out):
        codes, _ = _wait(procs, out, TIMEOUT_S, script)
    for i, code in enumerate(codes):
        assert code == 0, f"{script} process {i} failed (rc {code}):\n{_tail(out / f'log_{i}.txt')}"
    return read_metrics(workdir)


def _launches(workdir):
    """The output folders of the launches on `workdir`, in order."""
    found = workdir.parent.glob(f"{workdir.name}.launch*")
    return sorted(found, key=lambda p: int(p.name.rpartition(".launch")[2]))


def _top(path):
    """The first component of a path relative to the workdir ("." for the workdir itself)."""
    return (Path(path).parts or (".",))[0]


def _audit(workdir, i):
    """Process i's audited writes under `workdir` in its latest launch: [(event, path)]."""
    log = _launches(workdir)[-1] / f"audit_{i}.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    return [(e["event"], p) for e in events for p in e["paths"]]


def _assert_only_primary_writes_shared_files(workdir):
    """Processes 1-3 changed nothing outside checkpoints/; returns what they did there."""
    inside = set()
    for i in range(1, NUM_PROCESSES):
        writes = _audit(workdir, i)
        outside = [(e, p) for e, p in writes if _top(p) != "checkpoints"]
        assert not outside, f"process {i} wrote outside checkpoints/: {outside[:10]}"
        inside |= {(i, e, p) for e, p in writes}
    return inside


def _assert_rows_close(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=TOL, atol=TOL, err_msg=key)


def _assert_weights_close(a, b):
    wa, wb = (load_file(str(d / "hf" / "model.safetensors")) for d in (a, b))
    assert set(wa) == set(wb)
    for key in wa:
        np.testing.assert_allclose(wa[key], wb[key], rtol=TOL, atol=TOL, err_msg=key)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder with the workers' sitecustomize.py (first on their PYTHONPATH)."""
    folder = tmp_path_factory.mktemp("site")
    shutil.copy(SITECUSTOMIZE, folder / "sitecustomize.py")
    return folder


@pytest.fixture(scope="module")
def sft(tiny_sft_workdir):
    """The session's tiny SFT run (conftest; read-only): the --init-from of every run here."""
    return tiny_sft_workdir.workdir


@pytest.fixture(scope="module")
def dpo_args(sft):
    return ("--init-from", str(sft), *DPO)


@pytest.fixture(scope="module")
def dpo_runs(dpo_args, site, tmp_path_factory):
    """The DPO command on one process and on 4 (uninterrupted): (workdir, rows) of each."""
    one = tmp_path_factory.mktemp("dpo_single") / "run"
    four = tmp_path_factory.mktemp("dpo_multi") / "run"
    want, got = _run_both("dpo.py", dpo_args, one, four, site)
    return (one, want), (four, got)


@pytest.fixture(scope="module")
def dpo_multi(dpo_runs):
    return dpo_runs[1]


def test_dpo_on_four_processes_matches_one_process(dpo_runs):
    (one, want), (four, got) = dpo_runs
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    _assert_rows_close(got, want)
    assert np.ptp([r["loss"] for r in want]) > 100 * TOL  # real updates
    _assert_weights_close(four, one)
    # Every process sampled the same pairs from the SFT model; process 0 wrote them.
    assert (four / "pairs.jsonl").read_bytes() == (one / "pairs.jsonl").read_bytes()


def test_only_process_zero_writes_shared_files(dpo_multi):
    workdir, _ = dpo_multi
    primary = _audit(workdir, 0)
    tops = {_top(p) for _, p in primary}
    want = {
        "run_config.json",
        "pairs.jsonl",
        "metrics.jsonl",
        "tensorboard",
        "model_config.json",
        "samples.jsonl",
    }
    assert want <= tops, tops
    # hf/ is written into a temporary sibling folder renamed into place (atomic).
    assert any(e == "os.rename" and p == "hf" for e, p in primary), primary
    inside = _assert_only_primary_writes_shared_files(workdir)
    # Under checkpoints/ a non-primary process writes its own files only: from Python its
    # state/array_metadatas/process_<i>, natively (TensorStore) its shards, state/ocdbt.process_<i>.
    assert inside and all(f"process_{i}" in p for i, _, p in inside), sorted(inside)
    for step in ("2", "4", "6"):
        state = workdir / "checkpoints" / step / "state"
        for i in range(NUM_PROCESSES):
            assert (state / f"ocdbt.process_{i}").is_dir(), sorted(os.listdir(state))
            assert (state / "array_metadatas" / f"process_{i}").is_file()


def _kill_when(path, procs, out, victims):
    """Waits until `path` exists (every process still running), then SIGKILLs `victims`."""
    deadline = time.monotonic() + TIMEOUT_S
    while not path.is_dir():
        for i, proc in enumerate(procs):
            assert proc.poll() is None, f"process {i} exited:\n{_tail(out / f'log_{i}.txt')}"
        assert time.monotonic() < deadline, f"no {path} after {TIMEOUT_S} s"
        time.sleep(0.005)
    for i in victims:
        procs[i].send_signal(signal.SIGKILL)


def _renamed(workdir):
    """What process 0 renamed into place under `workdir` in its latest launch."""
    return {p for e, p in _audit(workdir, 0) if e == "os.rename"}


def test_dead_peer_aborts_the_others_and_relaunches_resume_bit_exactly(
    dpo_args, dpo_multi, site, tmp_path
):
    """SIGKILL of process 2 after the first checkpoint: the 3 others exit non-zero within the
    bound with jax's heartbeat error. The same 4 commands resume from that checkpoint; SIGKILL
    of all 4 (a preempted pod) after the next one; the same 4 commands again finish the run."""
    reference, want = dpo_multi
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    with _launch("dpo.py", dpo_args, workdir, site) as (procs, out):
        _kill_when(checkpoints / "2", procs, out, victims=[2])
        codes, times = _wait(procs, out, DEAD_PEER_S + 30, "survivors of a dead peer")
        logs = [_tail(out / f"log_{i}.txt", 100_000) for i in range(NUM_PROCESSES)]
    assert codes[2] == -signal.SIGKILL
    for i in (0, 1, 3):
        assert codes[i] != 0, f"process {i} exited 0 after its peer died:\n{logs[i][-3000:]}"
        assert times[i] <= DEAD_PEER_S, f"process {i} took {times[i]:.1f} s"
        assert all(m in logs[i] for m in DEAD_PEER_MESSAGES), logs[i][-3000:]
    print(f"\nsurvivors exited with {codes} after {max(times[i] for i in (0, 1, 3)):.1f} s")
    assert not (workdir / "hf").exists()  # killed mid-run

    with _launch("dpo.py", dpo_args, workdir, site) as (procs, out):  # the very same commands
        _kill_when(checkpoints / "4", procs, out, victims=range(NUM_PROCESSES))
        codes, _ = _wait(procs, out, 60, "killed processes")
    assert codes == [-signal.SIGKILL] * NUM_PROCESSES
    assert not (workdir / "hf").exists()
    assert "checkpoints/2" not in _renamed(workdir)  # resumed from step 2, not from scratch
    _assert_only_primary_writes_shared_files(workdir)

    rows = _run_multi("dpo.py", dpo_args, workdir, site)
    assert not {"checkpoints/2", "checkpoints/4"} & _renamed(workdir)  # resumed from step 4
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # each step once
    assert rows == want  # bit for bit (JSON floats round-trip exactly)
    weights = "hf/model.safetensors"
    assert (workdir / weights).read_bytes() == (reference / weights).read_bytes()
    _assert_only_primary_writes_shared_files(workdir)


@pytest.mark.parametrize("script", ["ppo.py", "grpo.py"])
def test_rl_on_four_processes_matches_one_process(script, sft, site, tmp_path_factory):
    """PPO with the ground-truth host reward (each host scores its own rollout rows) and GRPO on
    the sentiment task (its evaluation runs on the sharded policy too): one iteration each."""
    args = ("--init-from", str(sft), *{"ppo.py": PPO, "grpo.py": GRPO}[script])
    name = script.removesuffix(".py")
    if script == "grpo.py":
        prompts = tmp_path_factory.mktemp("reviews") / "prompts.jsonl"
        rows = [{"prompt": p, "word": w} for p, w in zip(REVIEWS, ["good", "bad", "the"] * 3)]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = (*args, "--dataset", str(prompts))
    one = tmp_path_factory.mktemp(f"{name}_single") / "run"
    four = tmp_path_factory.mktemp(f"{name}_multi") / "run"
    want, got = _run_both(script, args, one, four, site)
    assert [r["step"] for r in want] == [1] and want[0]["update_norm"] > 100 * TOL
    samples = [read_metrics(w, "samples.jsonl") for w in (one, four)]
    assert len(samples[0]) == 4 and samples[0] == samples[1]
    if script == "grpo.py":
        assert "rewards/mentions" in want[0]
        logged = [read_metrics(w, "completions.jsonl") for w in (one, four)]
        assert len(logged[0]) == 8 * 4  # every row of the iteration, from every host
        key = ("index", "prompt", "completion")
        assert [[r[k] for k in key] for r in logged[1]] == [[r[k] for k in key] for r in logged[0]]
        for a, b in zip(*logged):
            assert b["reward"] == pytest.approx(a["reward"], abs=TOL)
        mean = np.mean([r["rewards"]["mentions"] for r in logged[1]])
        assert got[0]["rewards/mentions"] == pytest.approx(mean, abs=TOL)
    _assert_rows_close(got, want)
    _assert_weights_close(four, one)
    _assert_only_primary_writes_shared_files(four)
