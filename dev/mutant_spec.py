"""A mutant of `dev/mutants.py`: one line of the library replaced, and the tests that must catch it;
the test files several mutants share."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    """`old` (exactly once in `path`) becomes `new`; `tests` are pytest arguments."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


STEP_TESTS = ("tests/test_step_gradients.py",)
PPO_TESTS = ("tests/test_train_ppo_update.py", "tests/test_train_ppo.py")
CRITIC_FREE_TESTS = ("tests/test_losses_critic_free.py",)
FAMILY_TESTS = (
    "tests/test_families.py::test_logits_match_transformers",
    "tests/test_families.py::test_greedy_decoding_matches_transformers_generate",
)
