"""Where `fit` reports (`run.reporting`, `run.callbacks`), on test_run_runner's least-squares toy:

- the callback hooks run at the steps the docstring names, see the state of that step, and what
  `on_eval` returns joins the row as `eval/<name>` (also without an `eval_fn`);
- W&B in its offline mode: the history in the run's `.wandb` log (read here with a reader of the
  LevelDB log format written from its description, not wandb's) equals metrics.jsonl row for row;
  the run config is run_config.json; a resumed run continues the same W&B run; the samples table
  holds samples.jsonl's rows;
- TensorBoard: scalars and the samples' text table read back from the event file (TFRecord
  framing parsed here), and samples.jsonl rewound on resume like metrics.jsonl;
- `--report-to` checked at the door: unknown names, `none` with others, a missing package or login.
"""

import json
import shutil
import struct
import sys

import numpy as np
import pytest
from test_run_runner import _fit

from rlhf_jax.errors import ConfigError
from rlhf_jax.run import callbacks, reporting
from rlhf_jax.run.metrics_writer import SAMPLES_FILE, read_metrics


class Recorder(callbacks.Callback):
    def __init__(self):
        self.calls = []

    def on_log(self, event):
        self.calls.append(("log", event.step, dict(event.row)))

    def on_eval(self, event):
        w0 = float(np.asarray(event.state["params"]["w"])[0])
        self.calls.append(("eval", event.step, w0, dict(event.evals)))
        return {"w0_seen": w0}

    def on_checkpoint(self, event):
        names = sorted(p.name for p in event.checkpoint_dir.iterdir() if p.name.isdigit())
        self.calls.append(("checkpoint", event.step, names))


SAMPLES = [{"prompt": "a | b", "completion": "c\nd"}, {"prompt": "e", "completion": "f"}]


class Sampler(callbacks.Callback):
    def on_eval(self, event):
        assert event.policy() is None  # the toy has no policy
        event.writer.write_samples(event.step, [{**s, "at": event.step} for s in SAMPLES])


def test_hooks_run_at_their_steps_with_that_steps_state(tmp_path):
    rec = Recorder()
    _, rows = _fit(tmp_path, 10, log_every=4, checkpoint_every=6, eval_every=5, callbacks=[rec])
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [4, 5, 8, 10]
    kinds = [(c[0], c[1]) for c in rec.calls]
    assert kinds == [
        ("log", 4), ("eval", 5), ("log", 5), ("checkpoint", 6), ("log", 8),
        ("eval", 10), ("log", 10), ("checkpoint", 10),
    ]  # fmt: skip
    for call in rec.calls:
        if call[0] == "eval":  # the state after update t: the row's own w0 metric
            _, t, w0, evals = call
            assert evals == {}  # no eval_fn
            assert w0 == pytest.approx(by_step[t]["w0"])
            assert by_step[t]["eval/w0_seen"] == pytest.approx(w0)
        if call[0] == "log":
            assert call[2] == by_step[call[1]]
        if call[0] == "checkpoint":  # saved before the hook runs
            assert str(call[1]) in call[2]


def test_on_eval_sees_eval_fn_values_and_a_hookless_callback_is_refused(tmp_path):
    rec = Recorder()
    _fit(tmp_path / "a", 5, eval_every=5, callbacks=[rec],
         eval_fn=lambda state, t: {"w1": state["params"]["w"][1]})  # fmt: skip
    (kind, _, _, evals), *_ = [c for c in rec.calls if c[0] == "eval"]
    assert kind == "eval" and set(evals) == {"w1"}
    with pytest.raises(ValueError, match=r"callbacks\[0\].*none of the hooks"):
        _fit(tmp_path / "b", 5, callbacks=[object()])


# ----------------------------------------------------------------------------------------------
# Readers of the files, written from the formats' descriptions.


def _leveldb_records(path):
    """Records of a W&B `.wandb` file: a 7-byte header (":W&B", magic, version), then LevelDB
    log blocks of 32 KiB, each record a 7-byte header (crc32c, length, type: 1 full, 2 first,
    3 middle, 4 last) and its payload; a block's tail shorter than a header is padding."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            out.append(buf)
            buf = b""
    return out


def _wandb_run(run_dir):
    """(run record, history rows by step) of one offline W&B run folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("run-*.wandb")
    run, history = None, {}
    for raw in _leveldb_records(log):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history[items["_step"]] = items
    return run, history


def _tfrecords(path):
    """Payloads of a TFRecord file: u64 length, u32 crc of it, payload, u32 crc of the payload."""
    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(data[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
    return out


def _tensorboard(workdir):
    """{tag: {step: value}} of the scalars and {step: text} of the "samples" text summaries."""
    from tensorboardX.proto import event_pb2

    scalars, texts = {}, {}
    for events in sorted((workdir / "tensorboard").iterdir()):
        for raw in _tfrecords(events):
            event = event_pb2.Event()
            event.ParseFromString(raw)
            for v in event.summary.value:
                if v.HasField("tensor") and v.tag.startswith("samples"):
                    texts[event.step] = v.tensor.string_val[0].decode()
                elif v.HasField("simple_value") or v.WhichOneof("value") == "simple_value":
                    scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars, texts


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")  # the test extra installs it; `rlhf_jax[wandb]` for users
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "rlhf-tests")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def test_wandb_offline_history_is_metrics_jsonl_and_resumes_the_same_run(tmp_path, wandb_offline):
    wd = tmp_path / "toy_run"
    wd.mkdir()
    (wd / "run_config.json").write_text(json.dumps({"learning_rate": 0.05, "seed": 3}))
    kw = dict(log_every=2, checkpoint_every=4, eval_every=4, report_to=("wandb",))
    _fit(wd, 8, callbacks=[Sampler()], **kw)
    _fit(wd, 12, callbacks=[Sampler()], **kw)  # resumed from the checkpoint of step 8
    run_id = (wd / reporting.WANDB_ID_FILE).read_text().strip()
    first, second = sorted((wd / "wandb").glob("offline-run-*"))
    assert first.name.endswith(run_id) and second.name.endswith(run_id)
    run, history = _wandb_run(first)
    assert run.run_id == run_id and run.project == "rlhf-tests" and run.display_name == "toy_run"
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert config == {"learning_rate": 0.05, "seed": 3}
    _, resumed = _wandb_run(second)
    assert set(history) == {2, 4, 6, 8} and set(resumed) == {10, 12}
    history.update(resumed)
    for row in read_metrics(wd):
        logged = history[row["step"]]
        for key, value in row.items():
            if key != "step":
                assert logged[key] == pytest.approx(value, rel=1e-12), key
    table_path = history[12]["samples/path"]  # the table of the last evaluation
    (table,) = second.glob(f"files/{table_path}")
    table = json.loads(table.read_text())
    assert table["columns"] == list(reporting.SAMPLE_COLUMNS)
    assert table["data"] == [[12, s["prompt"], s["completion"]] for s in SAMPLES]


def test_tensorboard_scalars_and_sample_text_and_samples_rewound_on_resume(tmp_path):
    kw = dict(log_every=2, checkpoint_every=4, eval_every=3)
    _fit(tmp_path / "full", 9, callbacks=[Sampler()], **kw)
    full = read_metrics(tmp_path / "full", SAMPLES_FILE)
    assert [r["step"] for r in full] == [3, 3, 6, 6, 9, 9]
    assert full[-1] == {"step": 9, **SAMPLES[-1], "at": 9}
    part = tmp_path / "part"
    _fit(part, 6, callbacks=[Sampler()], **kw)  # samples at 3, 6; checkpoints at 4, 6
    assert [r["step"] for r in read_metrics(part, SAMPLES_FILE)] == [3, 3, 6, 6]
    shutil.rmtree(part / "checkpoints" / "6")  # as if killed before the last save finished
    _fit(part, 4, callbacks=[Sampler()], **kw)  # resumes at 4, nothing to run: files rewound
    assert [r["step"] for r in read_metrics(part, SAMPLES_FILE)] == [3, 3]
    assert [r["step"] for r in read_metrics(part)] == [2, 3, 4]
    _fit(part, 9, callbacks=[Sampler()], **kw)  # resumed from 4: step 6's samples written again
    assert read_metrics(part, SAMPLES_FILE) == full
    scalars, texts = _tensorboard(tmp_path / "full")
    for row in read_metrics(tmp_path / "full"):
        assert scalars["loss"][row["step"]] == pytest.approx(row["loss"], rel=1e-6)
    assert sorted(texts) == [3, 6, 9]
    assert texts[9] == reporting.samples_markdown(SAMPLES)
    assert "| a \\| b | c<br>d |" in texts[9]  # cells escaped for the markdown table


def test_report_to_is_checked_at_the_door(monkeypatch, tmp_path):
    check = reporting.check_report_to
    assert check(("tensorboard",)) == ("tensorboard",)
    assert check(("none",)) == () == check(())
    with pytest.raises(ConfigError, match=r"^--report-to foo: choose tensorboard and/or wandb"):
        check(("tensorboard", "foo"))
    with pytest.raises(ConfigError, match="none stands alone"):
        check(("tensorboard", "none"))
    with pytest.raises(ConfigError, match="named twice"):
        check(("tensorboard", "tensorboard"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match=r"rlhf_jax\[wandb\]"):
        check(("wandb",))
    monkeypatch.delitem(sys.modules, "wandb")
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))
    with pytest.raises(ConfigError, match="no W&B login found.*WANDB_MODE=offline"):
        check(("wandb",))
    empty.write_text("machine api.wandb.ai login user password abc\n")
    empty.chmod(0o600)
    assert check(("wandb",)) == ("wandb",)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert check(("tensorboard", "wandb")) == ("tensorboard", "wandb")
