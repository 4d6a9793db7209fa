"""Startup code of the 4-process driver tests' workers (tests/test_multihost_drivers.py): copied
as `sitecustomize.py` into a folder put first on their PYTHONPATH, so Python runs it before the
driver. Test-only; any failure here leaves the worker as it would be without it.

1. A write audit. With MULTIHOST_AUDIT_LOG and MULTIHOST_AUDIT_ROOT set, a `sys.addaudithook`
   hook appends one JSON line `{"event", "paths"}` to the log (a file outside the root) for every
   file-system change that Python code of this process makes under the root: `open` for
   writing (`open()`, `os.open`, `tempfile.mkstemp`), `os.rename` (also `os.replace`),
   `os.mkdir` (`makedirs`, `mkdtemp`), `os.remove` (`unlink`), `os.rmdir`, `shutil.rmtree`,
   `os.truncate`, links, `shutil.copyfile` / `shutil.move`. Paths are relative to the root.
   Bytes written by native code into a file that Python did not create or rename there
   (TensorStore's array chunks under checkpoints/) are not seen.
2. One compilation cache for all processes. jax keys a CPU program's persistent-cache entry with
   a topology fingerprint that differs from process to process, and only process 0 writes
   entries, so processes 1-3 never hit the cache and each compiles every program itself. Here
   the devices of the key are their kinds and global ids (the same on every process), and with
   `jax_share_binary_between_hosts` process 0 compiles a multi-process program once and hands
   it to the others; a relaunch after a kill then loads every program from the cache.
"""

import json
import os
import sys

_WATCHED = {
    "open",
    "os.rename",
    "os.mkdir",
    "os.remove",
    "os.rmdir",
    "shutil.rmtree",
    "os.truncate",
    "os.link",
    "os.symlink",
    "shutil.copyfile",
    "shutil.move",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _install_audit(log_path: str, root: str) -> None:
    root = os.path.abspath(root)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # before the hook

    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            return None  # an open file descriptor, not a name
        path = os.fsdecode(path)
        if not os.path.isabs(path):
            base = os.getcwd()
            if isinstance(dir_fd, int) and dir_fd >= 0:
                base = os.readlink(f"/proc/self/fd/{dir_fd}")
            path = os.path.join(base, path)
        path = os.path.abspath(path)
        if path == root or path.startswith(root + os.sep):
            return os.path.relpath(path, root)
        return None

    def paths_of(event, args):
        if event == "open":
            _, mode, flags = args
            writes = isinstance(flags, int) and flags & _WRITE_FLAGS
            return [args[0]] if writes or (mode and set(mode) & set("wax+")) else []
        if event in ("os.rename", "os.link"):
            return [(args[0], args[2]), (args[1], args[3])]
        if event == "os.symlink":
            return [(args[1], args[2])]
        if event in ("shutil.copyfile", "shutil.move"):
            return list(args[:2]) if event == "shutil.move" else [args[1]]
        if event == "os.truncate":
            return [args[0]]
        return [(args[0], args[-1])]  # mkdir, remove, rmdir, rmtree: (path, ..., dir_fd)

    def hook(event, args):
        if event not in _WATCHED:
            return
        try:
            found = []
            for item in paths_of(event, args):
                path, dir_fd = item if isinstance(item, tuple) else (item, None)
                rel = resolve(path, dir_fd)
                if rel is not None:
                    found.append(rel)
            if found:
                os.write(fd, (json.dumps({"event": event, "paths": found}) + "\n").encode())
        except Exception:  # an audit hook must never break the code it watches
            pass

    sys.addaudithook(hook)


def _share_compiled_programs() -> None:
    import jax
    from jax._src import cache_key

    if not hasattr(cache_key, "_hash_accelerator_config"):
        return  # another jax: leave its cache keys (and compilation) as they are

    def same_on_every_process(hash_obj, devices):
        for device in devices.flat:
            cache_key._hash_string(hash_obj, f"{device.device_kind}:{device.id}")

    cache_key._hash_accelerator_config = same_on_every_process
    jax.config.update("jax_share_binary_between_hosts", True)
    jax.config.update("jax_share_binary_between_hosts_timeout_ms", 300_000)


try:
    if os.environ.get("MULTIHOST_AUDIT_LOG") and os.environ.get("MULTIHOST_AUDIT_ROOT"):
        _install_audit(os.environ["MULTIHOST_AUDIT_LOG"], os.environ["MULTIHOST_AUDIT_ROOT"])
    if os.environ.get("MULTIHOST_SHARE_COMPILED") == "1":
        _share_compiled_programs()
except Exception as e:  # pragma: no cover - startup must not fail because of the test harness
    print(f"multihost sitecustomize: {type(e).__name__}: {e}", file=sys.stderr)
