"""`rlhf_jax.paths` on local folders and on a fake GCS bucket, and SFT -> DPO with the workdir in
that bucket.

The bucket is `gcp-storage-emulator` (the GCS JSON API, in memory) served from a thread of this
process on a free localhost port; gcsfs (the project's own file I/O, through etils.epath) reaches
it through STORAGE_EMULATOR_HOST, TensorStore (Orbax's checkpoints) through
TENSORSTORE_GCS_HTTP_URL with a dummy token. Nothing leaves the machine. The drivers run
in-process through `main(argv)`, as in test_drivers.py; the rerun of the DPO command is a
subprocess, so that it reads everything back from the bucket with no state of the first run.
"""

import gzip
import json
import logging
import os
import socket
import subprocess
import sys

import fsspec
import jax
import numpy as np
import pytest
from helpers import drivers as driver_scripts

from rlhf_jax import checkpoint, data, paths
from rlhf_jax.data import synthetic
from rlhf_jax.run import handover, metrics_writer

BUCKET = "rlhf-jax-test"
_ROOT = driver_scripts.ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Keeps every client on this machine: gcsfs anonymous and without its bucket-layout probe (a
# gRPC call to Google with application-default credentials), no GCE metadata-server lookups (any
# that happens anyway goes to a closed loopback port).
_OFFLINE = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "FSSPEC_GCS_TOKEN": "anon",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
}


def _with_generation_headers(emulator):
    """Media downloads answer with x-goog-generation / x-goog-metageneration, as GCS does (the
    emulator leaves them out): TensorStore takes the generation of an object it read from there,
    and an OCDBT manifest committed twice in one save fails without it ("Malformed
    StorageGeneration")."""
    from gcp_storage_emulator.handlers import objects

    plain = objects.download
    if getattr(plain, "adds_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the plain handler has answered 404
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    download.adds_generation = True
    objects.download = download  # `get` with alt=media calls it by name
    for _, methods in emulator.HANDLERS:  # the routes that hold the function itself
        for method, handler in methods.items():
            if handler is plain:
                methods[method] = download


@pytest.fixture(scope="module")
def gcs():
    """A fake GCS with bucket BUCKET; yields the environment that points clients at it."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s are expected
    _with_generation_headers(emulator)
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        **_OFFLINE,
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore, under Orbax
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # TensorStore: no credential lookup
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        gcsfs = pytest.importorskip("gcsfs")  # after the variables: it reads them at import
        # This process: the plain GCSFileSystem (gcsfs may have been imported before), anonymous.
        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
            mp.setitem(fsspec.config.conf, protocol, {"token": "anon"})
        yield env
    server.stop()


def _gcs_fs():
    """epath's own gcsfs instance (to drop its listing cache after another process wrote)."""
    return paths.as_path(f"gs://{BUCKET}")._backend.fs(f"gs://{BUCKET}")


@pytest.fixture
def root(request, tmp_path):
    """A fresh folder: local (tmp_path) or in the fake bucket."""
    if request.param == "local":
        return paths.as_path(tmp_path)
    request.getfixturevalue("gcs")
    _gcs_fs().invalidate_cache()
    return paths.as_path(f"gs://{BUCKET}/unit/{request.node.name.split('[')[0]}")


both = pytest.mark.parametrize("root", ["local", "gcs"], indirect=True)


def test_as_path_is_cloud_and_as_str(tmp_path):
    assert paths.is_cloud("gs://b/x") and paths.is_cloud(paths.as_path("gs://b/x"))
    assert not paths.is_cloud(tmp_path) and not paths.is_cloud("file:///tmp/x")
    assert str(paths.as_path("gs://b/x") / "y") == "gs://b/x/y"
    assert paths.as_path("file:///tmp/x") == paths.as_path("/tmp/x")
    assert paths.as_str("gs://b/x") == "gs://b/x"
    assert paths.as_str("rel") == os.path.abspath("rel")
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        paths.as_path("memory://x")


@both
def test_atomic_writes_create_the_folder_and_leave_no_temporary_files(root):
    path = root / "a" / "b.json"
    paths.write_text_atomic(path, "one")
    paths.write_text_atomic(path, "two ü")
    paths.write_bytes_atomic(root / "a" / "c.bin", b"\x00\x01")
    assert path.read_text() == "two ü" and (root / "a" / "c.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (root / "a").iterdir()) == ["b.json", "c.bin"]


@both
def test_publish_dir_replaces_the_folder_whole(root, monkeypatch):
    def write(files):
        def fill(folder):
            for name, text in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(text)

        return fill

    target = root / "hf"
    paths.publish_dir(target, write({"old.txt": "x", "config.json": "{}"}))
    uploads = []
    upload = paths.upload_file
    monkeypatch.setattr(
        paths,
        "upload_file",
        lambda src, dst: (uploads.append(paths.as_path(dst).name), upload(src, dst)),
    )
    new = {"config.json": "{1}", "head.safetensors": "h", "a.txt": "a", "sub/b.txt": "b"}
    out = paths.publish_dir(target, write(new), last=("config.json", "head.safetensors"))
    assert out == target
    assert sorted(p.name for p in target.iterdir()) == [
        "a.txt",
        "config.json",
        "head.safetensors",
        "sub",
    ]
    assert (target / "config.json").read_text() == "{1}" and (
        target / "sub/b.txt"
    ).read_text() == "b"
    if paths.is_cloud(root):  # the files readers test for come last, in order
        assert uploads[-2:] == ["config.json", "head.safetensors"] and len(uploads) == 4
    else:  # renamed into place: no temporary sibling left
        assert uploads == [] and sorted(p.name for p in root.iterdir()) == ["hf"]

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("killed")

    if not paths.is_cloud(root):  # a failed write leaves the old folder as it was
        with pytest.raises(RuntimeError):
            paths.publish_dir(target, broken)
        assert (target / "config.json").read_text() == "{1}" and not (target / "half").exists()


@both
def test_safetensors_npz_and_local_copy_round_trip(root):
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.int32)}
    paths.save_safetensors(root / "m" / "model.safetensors", tensors, metadata={"format": "pt"})
    back = paths.load_safetensors(root / "m" / "model.safetensors")
    assert back.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])
    paths.save_npz(root / "r.npz", x=np.arange(3.0))
    np.testing.assert_array_equal(paths.load_npz(root / "r.npz")["x"], np.arange(3.0))
    with paths.local_copy(root / "m") as local:
        assert os.listdir(local) == ["model.safetensors"]


@both
def test_jsonl_appender_keeps_rows_and_appends(root):
    path = root / "run" / "metrics.jsonl"
    log = paths.JsonlAppender(path, [{"step": 1, "loss": 1.5}])
    log.append({"step": 2, "loss": float("nan")})
    log.append({"step": 3, "loss": 0.5})
    lines = path.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3] and "NaN" in lines[1]
    again = paths.JsonlAppender(path, [json.loads(x) for x in lines[:1]])  # resume at step 1
    again.append({"step": 2, "loss": 1.0})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


@both
def test_converted_readers_and_writers(root):
    """Metrics (with TensorBoard), rewind, JSONL records (gzip too), tokenizer save/load."""
    with metrics_writer.MetricsWriter(root / "w") as w:
        for step in (1, 2, 3):
            w.write(step, {"loss": 1.0 / step})
    assert [r["step"] for r in metrics_writer.read_metrics(root / "w")] == [1, 2, 3]
    events = [p for p in (root / "w" / "tensorboard").iterdir()]
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents")
    assert checkpoint.rewind_metrics(root / "w" / "metrics.jsonl", 2) == 2
    with metrics_writer.MetricsWriter(root / "w", resume_step=None, report_to=()) as w:
        w.write(3, {"loss": 0.1})
    assert [r["step"] for r in metrics_writer.read_metrics(root / "w")] == [1, 2, 3]

    pairs = [data.PreferenceRecord("p", "good", "bad", {"k": 1})]
    assert data.write_jsonl(root / "pairs.jsonl", pairs) == 1
    assert data.read_preference_jsonl(root / "pairs.jsonl") == pairs
    line = json.dumps(data.record_to_dict(pairs[0])).encode() + b"\n"
    paths.write_bytes_atomic(root / "pairs.jsonl.gz", gzip.compress(line))
    assert data.read_preference_jsonl(root / "pairs.jsonl.gz") == pairs

    tok = data.Tokenizer(synthetic.train_tokenizer(["a fine film", "a dull film"] * 4, 300))
    saved = tok.save(root / "tok")
    assert saved == os.fspath(root / "tok" / "tokenizer.json")
    back = data.load_tokenizer(root / "tok")
    assert back.encode("a fine film") == tok.encode("a fine film") and back.eos_id == tok.eos_id


def _ls(url):
    _gcs_fs().invalidate_cache()
    return sorted(p.name for p in paths.as_path(url).iterdir())


def test_sft_then_dpo_with_the_workdir_in_a_bucket(gcs):
    """SFT then DPO (--init-from the SFT workdir) write run config, metrics, TensorBoard,
    checkpoints (Orbax through TensorStore) and the hand-over into the bucket; the DPO command
    rerun with more steps (a fresh process) resumes from the bucket's checkpoint and pairs."""
    run = f"gs://{BUCKET}/run"
    sft_dir, dpo_dir = f"{run}/sft", f"{run}/dpo"
    schedule = ["--log-every", "1", "--checkpoint-every", "2", "--warmup-steps", "0"]
    sft = driver_scripts.load("sft")
    rows = sft.main(["--preset", "tiny", "--workdir", sft_dir, "--steps", "2", *schedule])
    assert [r["step"] for r in rows] == [1, 2]
    assert _ls(sft_dir) == [
        "checkpoints", "hf", "metrics.jsonl", "model_config.json", "run_config.json",
        "samples.jsonl", "tensorboard",
    ]  # fmt: skip
    assert _ls(f"{sft_dir}/hf") == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert _ls(f"{sft_dir}/checkpoints") == ["2"]
    assert json.loads(paths.as_path(f"{sft_dir}/run_config.json").read_text())["steps"] == 2

    dpo_args = ["--preset", "tiny", "--workdir", dpo_dir, "--init-from", sft_dir]
    dpo_args += ["--num-prompts", "4", "--batch-size", "8", "--precompute-reference", *schedule]
    dpo = driver_scripts.load("dpo")
    rows = dpo.main([*dpo_args, "--steps", "2"])
    assert [r["step"] for r in rows] == [1, 2]
    assert {"checkpoints", "hf", "pairs.jsonl", "reference_logps.npz"} <= set(_ls(dpo_dir))
    assert _ls(f"{dpo_dir}/checkpoints") == ["2"]
    pairs_info = _gcs_fs().info(f"{dpo_dir}/pairs.jsonl")
    # The hand-over read back from the bucket is the SFT model.
    cfg, params = handover.load_init_params(sft_dir)
    assert cfg.d_model == 64

    env = {**os.environ, **gcs}
    cmd = [sys.executable, str(_ROOT / "experiments" / "dpo.py"), *dpo_args, "--steps", "3"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # Every client stayed on the emulator: no credential or bucket-layout lookups were tried.
    assert "metadata server" not in out.stderr and "bucket type" not in out.stderr
    _gcs_fs().invalidate_cache()
    steps = [r["step"] for r in metrics_writer.read_metrics(dpo_dir)]
    assert steps == [1, 2, 3]  # resumed after step 2: no row twice
    assert _ls(f"{dpo_dir}/checkpoints") == ["2", "3"]
    events = list(paths.as_path(f"{dpo_dir}/tensorboard").iterdir())  # one file per run
    assert events and all(e.name.startswith("events.out.tfevents") for e in events)
    assert all(len(e.read_bytes()) > 100 for e in events)
    # The pairs were read back from the bucket, not sampled and written again.
    assert _gcs_fs().info(f"{dpo_dir}/pairs.jsonl")["generation"] == pairs_info["generation"]
    cfg, params = handover.load_init_params(dpo_dir)
    assert cfg.d_model == 64 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
