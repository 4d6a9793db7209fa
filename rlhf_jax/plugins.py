"""A user's function named on the command line: `module:function` (a module on the working
directory or the Python path) or `path/to/file.py:function`, wherever the library chooses
something by name (a DPO loss, a reward, a KL estimator, a baseline).

    fn = load_callable("my_rewards:exact_match", flag="--reward-fn")
    fn = load_callable("rewards/gsm8k.py:format_ok", flag="--reward-fn")
    is_callable_spec("sigmoid")   # False: a built-in name, not module:function

Errors are one line naming the flag and what to change.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any


def is_callable_spec(value: Any) -> bool:
    """Whether `value` names a function as `module:function` (a built-in name has no colon)."""
    return isinstance(value, str) and ":" in value.strip(":") and "://" not in value


def _module(name: str, flag: str, spec: str) -> Any:
    if name.endswith(".py") or os.sep in name or "/" in name:
        if not os.path.isfile(name):
            raise ValueError(f"{flag} {spec}: no such file {name}")
        module_name = "rlhf_jax_user_" + os.path.splitext(os.path.basename(name))[0]
        loader = importlib.util.spec_from_file_location(module_name, name)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise ValueError(
                f"{flag} {spec}: {name} fails to import: {type(e).__name__}: {e}"
            ) from None
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a module beside where the command runs
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ValueError(
            f"{flag} {spec}: no module {e.name!r} (run from its folder, add it to PYTHONPATH, or "
            "give path/to/file.py:function)"
        ) from None
    except Exception as e:
        raise ValueError(
            f"{flag} {spec}: {name} fails to import: {type(e).__name__}: {e}"
        ) from None


def load_callable(spec: str, *, flag: str = "function") -> Callable[..., Any]:
    """The function `spec` names (`module:function` or `path/file.py:function`; dotted names
    reach into classes or submodules: `module:Class.method`).

    Raises:
      ValueError: one line naming `flag`: not module:function, an unimportable module, a missing
        name, or a name that is not callable.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not (sep and module_name and attr):
        raise ValueError(f"{flag} {spec}: expected module:function or path/to/file.py:function")
    obj = _module(module_name, flag, spec)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{flag} {spec}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{flag} {spec}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def choose(value: Any, names: Any, *, flag: str = "function") -> Any:
    """A built-in name of `names`, or the function `value` names as `module:function` (or a
    callable passed from code, returned as it is).

    Raises:
      ValueError: one line naming `flag`: an unknown name (with the choices), or a function that
        cannot be loaded (`load_callable`).
    """
    if callable(value):
        return value
    if is_callable_spec(value):
        return load_callable(value, flag=flag)
    if value in names:
        return value
    raise ValueError(f"{flag} {value}: choose one of {', '.join(names)}, or module:function")
