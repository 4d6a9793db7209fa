"""Local atomic writes of `rlhf_jax.paths` (and the writers built on them): the temporary file or
folder is a SIBLING of its target (a rename across filesystems is not atomic, and fails), it is
renamed onto the target, and nothing temporary is left after a success or a failure (the old
content stays on a failure).

`os.replace` / `os.rename` are wrapped to record every (source, target) pair; a failing rename is
injected the same way."""

import json
import os

import numpy as np
import pytest

from rlhf_jax import checkpoint, paths


class _Renames:
    """Records `os.replace` / `os.rename` calls (and can make the next ones fail)."""

    def __init__(self, monkeypatch):
        self.calls, self.fail = [], False
        for name in ("replace", "rename"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def rename(src, dst, *args, **kwargs):
            self.calls.append((os.fspath(src), os.fspath(dst)))
            if self.fail:
                raise OSError("injected: cross-device link")
            return real(src, dst, *args, **kwargs)

        return rename

    def assert_siblings(self, *targets):
        """One rename per target, each from a different name in the target's own folder."""
        assert [dst for _, dst in self.calls] == [os.fspath(t) for t in targets]
        for src, dst in self.calls:
            assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst)), (
                src,
                dst,
            )
            assert os.path.basename(src) != os.path.basename(dst)


def _writers(folder, src):
    """name -> (target, write(content)) for each local atomic writer, `content` a str (`src`:
    upload_file's local source)."""
    return {
        "write_text_atomic": (
            folder / "a.txt",
            lambda c: paths.write_text_atomic(folder / "a.txt", c),
        ),
        "write_bytes_atomic": (
            folder / "b.bin",
            lambda c: paths.write_bytes_atomic(folder / "b.bin", c.encode()),
        ),
        "upload_file": (
            folder / "c.txt",
            lambda c: (src.write_text(c), paths.upload_file(src, folder / "c.txt")),
        ),
        "save_safetensors": (
            folder / "d.safetensors",
            lambda c: paths.save_safetensors(
                folder / "d.safetensors", {"x": np.frombuffer(c.encode(), np.uint8).copy()}
            ),
        ),
        "save_npz": (
            folder / "e.npz",
            lambda c: paths.save_npz(folder / "e.npz", x=np.frombuffer(c.encode(), np.uint8)),
        ),
        "JsonlAppender": (
            folder / "f.jsonl",
            lambda c: paths.JsonlAppender(folder / "f.jsonl", [{"c": c}]),
        ),
    }


def _read(target):
    if target.suffix == ".safetensors":
        return paths.load_safetensors(target)["x"].tobytes().decode()
    if target.suffix == ".npz":
        return paths.load_npz(target)["x"].tobytes().decode()
    if target.suffix == ".jsonl":
        return json.loads(target.read_text())["c"]
    return target.read_bytes().decode()


@pytest.mark.parametrize(
    "writer",
    [
        "write_text_atomic",
        "write_bytes_atomic",
        "upload_file",
        "save_safetensors",
        "save_npz",
        "JsonlAppender",
    ],
)
def test_a_write_renames_a_sibling_and_leaves_nothing_behind(tmp_path, monkeypatch, writer):
    folder = tmp_path / "deep" / "er"  # created by the writer
    target, write = _writers(folder, tmp_path / "source.txt")[writer]
    renames = _Renames(monkeypatch)
    write("old")
    renames.assert_siblings(target)
    assert _read(target) == "old"
    renames.calls.clear()
    write("new")  # over an existing file
    renames.assert_siblings(target)
    assert _read(target) == "new"
    assert [p.name for p in folder.iterdir()] == [target.name]

    renames.fail = True  # the rename fails: the old file stays, the temporary one is removed
    with pytest.raises(OSError, match="injected"):
        write("lost")
    renames.fail = False
    assert _read(target) == "new"
    assert [p.name for p in folder.iterdir()] == [target.name]


def test_a_failed_write_before_the_rename_leaves_nothing(tmp_path, monkeypatch):
    renames = _Renames(monkeypatch)
    with pytest.raises(TypeError):
        paths.write_bytes_atomic(tmp_path / "x.bin", "not bytes")  # fails inside the write
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own error type)
        paths.save_safetensors(tmp_path / "y.safetensors", {"x": "not an array"})
    assert renames.calls == [] and list(tmp_path.iterdir()) == []


def test_publish_dir_renames_a_sibling_folder_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "run" / "hf"
    renames = _Renames(monkeypatch)
    seen = []

    def fill(text):
        def write(folder):
            seen.append(os.fspath(folder))
            (folder / "config.json").write_text(text)

        return write

    paths.publish_dir(target, fill("one"))
    renames.assert_siblings(target)
    assert os.path.dirname(seen[0]) == os.fspath(target.parent)  # filled in place, not in /tmp
    renames.calls.clear()
    paths.publish_dir(target, fill("two"))
    renames.assert_siblings(target)
    assert (target / "config.json").read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["hf"]

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        paths.publish_dir(target, broken)
    assert [p.name for p in target.parent.iterdir()] == ["hf"]  # no temporary folder left
    assert (target / "config.json").read_text() == "two"
    renames.fail = True
    with pytest.raises(OSError, match="injected"):
        paths.publish_dir(target, fill("three"))
    # No temporary folder left; the target is absent or complete (the old folder was removed
    # just before the failed rename).
    assert {p.name for p in target.parent.iterdir()} <= {"hf"}
    assert not target.exists() or (target / "config.json").read_text() == "two"


def test_rewind_metrics_rewrites_the_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    renames = _Renames(monkeypatch)
    assert checkpoint.rewind_metrics(path, 2) == 2
    renames.assert_siblings(path)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
