"""File I/O for local folders and cloud buckets alike: every file the project reads or writes
goes through here, on `etils.epath` (the path library of Orbax and TFDS).

A path is a local one (`str` or `os.PathLike`, relative or absolute) or a URL that epath knows:
`gs://` (through fsspec's `gcsfs`: `pip install -e '.[cloud]'`), `s3://`, `az://` (through
`s3fs` / `adlfs`, installed by hand). Reading works the same everywhere; what differs is how a
write is made safe against a kill or a concurrent reader, since object stores have no rename:

- `write_text_atomic` / `write_bytes_atomic` / `save_safetensors`: local, a temporary sibling
  then `os.replace` (a reader sees the old file or the new one, never half); cloud, one object
  upload, which the store makes visible only once complete (also atomic).
- `publish_dir` (a hand-over folder): local, written into a temporary sibling folder renamed into
  place (atomic); cloud, no folder rename exists, so the old folder is deleted, the new one is
  written in place and the files named in `last`, those readers test for completeness, are
  uploaded last. A kill half-way leaves a folder without them, which readers take for an
  unfinished stage; rerunning the stage writes it again.
- `JsonlAppender` (metrics.jsonl): local, appended and flushed line by line (a kill can only cut
  the last line); cloud objects cannot be appended, so each append rewrites the whole object from
  the rows kept in memory (each upload atomic: the file has every row up to some append).
- `local_copy`: a local file or folder for readers that need one (safetensors, tokenizers); for
  a cloud path, a temporary download.

Only the caller decides who writes: shared files are written by the primary host alone
(`distributed.is_primary()`), as before; every host can read.

    path = as_path(workdir) / "run_config.json"     # an epath.Path, local or gs://
    write_text_atomic(path, text)
    save_safetensors(folder / "model.safetensors", tensors)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_COPY_CHUNK = 8 << 20  # bytes per read when streaming a file to or from a bucket


def is_cloud(path: PathLike) -> bool:
    """True for a URL path (`gs://`, `s3://`, ...), False for a local one (`file://` included)."""
    match = _URL.match(os.fspath(path))
    return match is not None and match.group(1).lower() != "file"


def as_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path` (local paths stay as given, relative ones too).

    Raises:
      ValueError: a URL scheme epath does not know (e.g. `memory://`).
    """
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    try:
        return epath.Path(text)
    except KeyError:
        raise ValueError(
            f"{text}: unsupported URL scheme; use a local path, gs:// (pip install -e "
            "'.[cloud]'), s3:// or az://"
        ) from None


def as_str(path: PathLike) -> str:
    """The string for libraries that take one (Orbax, TensorBoard, JAX's compilation cache): an
    absolute local path, or the URL."""
    if is_cloud(path):
        return os.fspath(as_path(path))
    return os.path.abspath(os.fspath(as_path(path)))


def _local_tmp(path: epath.Path) -> str:
    return os.path.join(os.fspath(path.parent), f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that a reader sees the old or the new content, never a part
    (local: temporary sibling + `os.replace`; cloud: one object upload). Creates the parent."""
    path = as_path(path)
    if is_cloud(path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _local_tmp(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: PathLike, text: str) -> None:
    """`write_bytes_atomic` of `text` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def upload_file(local: PathLike, path: PathLike) -> None:
    """Copies the local file `local` to `path` (streamed; atomic as `write_bytes_atomic`)."""
    path = as_path(path)
    if not is_cloud(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _local_tmp(path)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with open(local, "rb") as src, path.open("wb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


def _upload_tree(local: str, path: epath.Path, last: Sequence[str]) -> None:
    files = []
    for root, _, names in os.walk(local):
        for name in names:
            files.append(os.path.relpath(os.path.join(root, name), local))
    rank = {name: i for i, name in enumerate(last)}
    for rel in sorted(files, key=lambda f: (rank.get(f, -1), f)):  # `last` ones at the end
        upload_file(os.path.join(local, rel), path / rel)


def publish_dir(
    path: PathLike, write: Callable[[epath.Path], None], *, last: Sequence[str] = ()
) -> epath.Path:
    """Writes a folder whole: `write(folder)` fills a local temporary folder, which becomes `path`.

    Local: the temporary folder is a sibling renamed into place (an existing `path` is replaced),
    so `path` is absent or complete. Cloud: the old `path` is deleted, then every file is uploaded
    with the files named in `last` (paths relative to the folder) uploaded last, in that order:
    readers that test for them never take a half-written folder for a complete one.

    Args:
      path: the folder to publish.
      write: fills the folder it is given (a local `epath.Path`).
      last: the files readers test for completeness (cloud upload order; ignored locally).
    Returns:
      `path` as an epath.Path.
    """
    path = as_path(path)
    if is_cloud(path):
        with tempfile.TemporaryDirectory(prefix="rlhf_jax_publish_") as tmp:
            write(as_path(tmp))
            if path.exists():
                path.rmtree()
            _upload_tree(tmp, path, last)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=os.fspath(path.parent))
    try:
        write(as_path(tmp))
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local path holding what `path` holds (a file or a folder tree): `path` itself when it is
    local, else a temporary download removed on exit."""
    if not is_cloud(path):
        yield os.fspath(path)
        return
    src = as_path(path)
    with tempfile.TemporaryDirectory(prefix="rlhf_jax_download_") as tmp:
        dst = os.path.join(tmp, src.name)
        if src.is_dir():
            _download_tree(src, dst)
        else:
            _download(src, dst)
        yield dst


def _download_tree(src: epath.Path, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            _download_tree(child, os.path.join(dst, child.name))
        else:
            _download(child, os.path.join(dst, child.name))


def _download(src: epath.Path, dst: str) -> None:
    with src.open("rb") as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out, _COPY_CHUNK)


def save_safetensors(
    path: PathLike, tensors: Mapping[str, np.ndarray], *, metadata: Mapping[str, str] | None = None
) -> None:
    """`safetensors.numpy.save_file` to a local or cloud `path`, atomically (the file is written
    locally, then renamed into place or streamed up as one object)."""
    from safetensors.numpy import save_file

    path = as_path(path)
    meta = dict(metadata) if metadata is not None else None
    if not is_cloud(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _local_tmp(path)
        try:
            save_file(dict(tensors), tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="rlhf_jax_upload_") as tmp:
        local = os.path.join(tmp, path.name)
        save_file(dict(tensors), local, metadata=meta)
        upload_file(local, path)


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """`safetensors.numpy.load_file` of a local or cloud `path` (a cloud file is downloaded to a
    temporary local file first)."""
    from safetensors.numpy import load_file

    with local_copy(path) as local:
        return load_file(local)


def save_npz(path: PathLike, **arrays: Any) -> None:
    """`np.savez` to a local or cloud `path`, atomically (`write_bytes_atomic`)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file (local or cloud), read into memory."""
    with np.load(io.BytesIO(as_path(path).read_bytes())) as z:
        return {k: z[k] for k in z.files}


class JsonlAppender:
    """A JSONL file that grows one row at a time and survives a kill.

    Opening writes the file anew with exactly `rows` (atomically); `append` then adds one row:
    locally appended and flushed; on a cloud path the whole object is rewritten from the rows kept
    in memory (objects cannot be appended; the upload is atomic).

    Args:
      path: the .jsonl file (its folder is created).
      rows: the rows the file starts with (e.g. those kept on resume).
    """

    def __init__(self, path: PathLike, rows: Sequence[Mapping[str, Any]] = ()):
        self.path = as_path(path)
        self._cloud = is_cloud(self.path)
        self._lines = [json.dumps(dict(r), allow_nan=True) + "\n" for r in rows]
        write_text_atomic(self.path, "".join(self._lines))
        if not self._cloud:
            self._lines = []  # the file holds them; nothing to keep in memory

    def append(self, row: Mapping[str, Any]) -> None:
        """Adds `row` as one line (`json.dumps`, NaN/Inf allowed) and makes it durable."""
        line = json.dumps(dict(row), allow_nan=True) + "\n"
        if self._cloud:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
