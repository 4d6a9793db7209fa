"""The mutant tables of `dev/mutants.py` still apply to the tree: every mutant's line occurs exactly
once in its file (a moved or edited line would make the mutant a no-op or an error), its
replacement differs, names are unique, and every test it names exists. Running the mutants is
`python dev/mutants.py` (not part of `make test`); this keeps the tables from rotting between runs.
"""

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    sys.path.insert(0, str(ROOT / "dev"))
    try:
        spec = importlib.util.spec_from_file_location("dev_mutants", ROOT / "dev" / "mutants.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "dev"))
    return module.MUTANTS


def _test_files(tests: tuple[str, ...]) -> list[str]:
    """The file[::name] arguments among pytest arguments (options and `-k` values skipped)."""
    out, skip = [], False
    for arg in tests:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in ("-k", "-m")
        else:
            out.append(arg)
    return out


def test_every_mutant_applies_once_and_names_existing_tests():
    mutants = _mutants()
    assert len({m.name for m in mutants}) == len(mutants), "two mutants share a name"
    problems = []
    for m in mutants:
        source = (ROOT / m.path).read_text() if (ROOT / m.path).is_file() else None
        if source is None:
            problems.append(f"{m.name}: no file {m.path}")
            continue
        if source.count(m.old) != 1:
            problems.append(f"{m.name}: its line occurs {source.count(m.old)} times in {m.path}")
        if m.new == m.old:
            problems.append(f"{m.name}: the replacement is the line itself")
        if not _test_files(m.tests):
            problems.append(f"{m.name}: names no test")
        for arg in _test_files(m.tests):
            file, _, name = arg.partition("::")
            if not (ROOT / file).is_file():
                problems.append(f"{m.name}: no test file {file}")
                continue
            defined = {
                n.name
                for n in ast.walk(ast.parse((ROOT / file).read_text()))
                if isinstance(n, ast.FunctionDef)
            }
            if name and name.split("[")[0] not in defined:
                problems.append(f"{m.name}: no test {arg}")
    assert problems == []


def test_pytest_options_are_not_taken_for_test_files():
    assert _test_files(("tests/a.py", "-k", "b", "-x", "tests/c.py::d")) == [
        "tests/a.py",
        "tests/c.py::d",
    ]
