"""Curated one-line mutations of the steps, losses, sampler and checkpoint path: does some test
catch each of them?

    .venv/bin/python dev/mutants.py                 # every mutant, two at a time (~10 min)
    .venv/bin/python dev/mutants.py --list          # the table, nothing run
    .venv/bin/python dev/mutants.py --only dpo-stop-grad-chosen ppo-stale-ratio --jobs 1

Each mutant replaces one line of the library (an exact, unique substring of one file) in a
temporary copy of the working tree (tracked and untracked-but-not-ignored files; the prepared
`data/` is linked, not copied) and runs only its related test files there (`pytest -x`).
"caught" means a test failed, "SURVIVED" that they all passed. First, the test files of the
selected mutants run once together on the unmutated copy (skip with --no-baseline): a red
baseline makes every "caught" meaningless. Exit status 1 if any mutant survived that is not in
`ACCEPTED_SURVIVORS`, or the baseline failed.

The mutants are listed in the tables beside this file (`mutants_methods.py`, `mutants_models.py`,
`mutants_streams.py`, `mutants_metrics.py`, `mutants_config.py`, `mutants_own.py`; a `Mutant` is
`mutant_spec.py`);
`tests/test_mutants_table.py` checks that each still applies and names tests that exist.

A tool to run before closing an issue that touches a step, loss, the sampler or the checkpoint
path: not part of `make test`. Add a mutant for each bug a test was written to catch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the mutant tables beside this file

from mutant_spec import Mutant  # noqa: E402
from mutants_config import CONFIG  # noqa: E402
from mutants_methods import METHODS  # noqa: E402
from mutants_metrics import METRICS  # noqa: E402
from mutants_models import MODELS  # noqa: E402
from mutants_own import OWN  # noqa: E402
from mutants_streams import STREAMS  # noqa: E402

MUTANTS = (*METHODS, *MODELS, *STREAMS, *METRICS, *CONFIG, *OWN)

# name -> why it is accepted (an equivalent mutant, or one no test can see by design).
ACCEPTED_SURVIVORS: dict[str, str] = {}


def _tree_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def _copy_tree(dest: Path, files: list[str], source: Path = ROOT) -> None:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / f, target)
    if (ROOT / "data").is_dir():  # the prepared offline task: read-only for the tests
        (dest / "data").symlink_to(ROOT / "data", target_is_directory=True)


def _apply(dest: Path, mutant: Mutant) -> None:
    path = dest / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: expected the line once in {mutant.path}, "
                         f"found it {count} times (update dev/mutants.py)")  # fmt: skip
    path.write_text(text.replace(mutant.old, mutant.new))


def _run_pytest(dest: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.monotonic() - start
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _first_failure(output: str) -> str:
    match = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    return match.group(1).split("tests/", 1)[-1] if match else ""


def _line_of(mutant: Mutant) -> int:
    text = (ROOT / mutant.path).read_text()
    return text[: text.find(mutant.old)].count("\n") + 1


def run_one(
    mutant: Mutant, files: list[str], timeout: float, snapshot: Path
) -> tuple[str, str, float]:
    """(result, detail, seconds) of one mutant in its own temporary copy of `snapshot`."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        dest = Path(tmp)
        _copy_tree(dest, files, snapshot)
        _apply(dest, mutant)
        code, output, seconds = _run_pytest(dest, mutant.tests, timeout)
    if code == 1:
        return "caught", _first_failure(output), seconds
    if code == 0:
        return "SURVIVED", "", seconds
    tail = output.strip().splitlines()[-1:] or ["no output"]
    return "ERROR", f"pytest exit {code}: {tail[0][:100]}", seconds


def run_baseline(
    tests: tuple[str, ...], files: list[str], timeout: float, snapshot: Path
) -> tuple[int, str]:
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        dest = Path(tmp)
        _copy_tree(dest, files, snapshot)
        code, output, _ = _run_pytest(dest, tests, timeout)
    return code, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = parser.parse_args(argv)

    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"--only: unknown mutant(s) {', '.join(unknown)}; choose from: "
                     + ", ".join(sorted(names)))  # fmt: skip
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    for m in mutants:  # every line still exists, before anything runs
        if (ROOT / m.path).read_text().count(m.old) != 1:
            parser.error(f"mutant {m.name}: its line is not (once) in {m.path}; update it")
    width = max(len(m.name) for m in mutants)
    if args.list:
        for m in mutants:
            print(f"{m.name:<{width}}  {m.path}:{_line_of(m)}  {m.why}  [{' '.join(m.tests)}]")
        return 0

    files = _tree_files()
    # One snapshot of the working tree at the start: edits made while the tool runs do not leak
    # into later mutants.
    with tempfile.TemporaryDirectory(prefix="mutant-snapshot-") as snap:
        _copy_tree(Path(snap), files)
        return _run_all(args, mutants, files, Path(snap), width)


def _run_all(args, mutants, files, snapshot, width) -> int:
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        if not args.no_baseline:
            union = tuple(sorted({t for m in mutants for t in m.tests}))
            print(f"baseline: {len(union)} test files on the unmutated tree ...", flush=True)
            code, output = run_baseline(union, files, args.timeout, snapshot)
            if code != 0:
                print(f"baseline FAILED (pytest exit {code}):\n{output[-3000:]}")
                return 1
        print(f"{len(mutants)} mutants, {args.jobs} at a time\n", flush=True)
        header = f"{'mutant':<{width}}  {'result':<8}  {'time':>6}  caught by / detail"
        print(header + "\n" + "-" * len(header), flush=True)
        results = {}
        futures = {pool.submit(run_one, m, files, args.timeout, snapshot): m for m in mutants}
        for future in concurrent.futures.as_completed(futures):
            m = futures[future]
            result, detail, seconds = future.result()
            if result == "SURVIVED" and m.name in ACCEPTED_SURVIVORS:
                result, detail = "accepted", ACCEPTED_SURVIVORS[m.name]
            results[m.name] = result
            print(f"{m.name:<{width}}  {result:<8}  {seconds:5.0f}s  {detail}", flush=True)

    counts = {r: list(results.values()).count(r) for r in sorted(set(results.values()))}
    print("\n" + ", ".join(f"{n} {r}" for r, n in counts.items()))
    bad = [n for n, r in results.items() if r in ("SURVIVED", "ERROR")]
    if bad:
        print("not caught: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
