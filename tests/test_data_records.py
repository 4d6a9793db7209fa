"""Records and JSONL readers: every kind of bad line, skip reports, HH-RLHF conversion."""

import gzip
import json
import logging
import os

import pytest

from rlhf_jax.data import (
    BadRecordError,
    DemonstrationRecord,
    PreferenceRecord,
    PromptRecord,
    hh_rlhf_to_preference,
    read_demonstration_jsonl,
    read_hh_rlhf_jsonl,
    read_jsonl_records,
    read_preference_jsonl,
    read_prompt_jsonl,
    write_jsonl,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
BAD_FILE = os.path.join(FIXTURES, "preferences_bad.jsonl")
GOOD = {"prompt": "The movie was", "chosen": " good.", "rejected": " bad."}

# (second line of a file whose first line is good, words the message must contain)
BAD_LINES = {
    "missing field": (json.dumps({"prompt": "p", "rejected": "r"}), "missing field 'chosen'"),
    "non-string": (json.dumps({**GOOD, "chosen": 3}), "'chosen' must be a string"),
    "empty": (json.dumps({**GOOD, "prompt": ""}), "'prompt' is empty"),
    "whitespace": (json.dumps({**GOOD, "rejected": " \t"}), "'rejected' is empty"),
    "invalid utf-8": (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "invalid UTF-8"),
    "invalid json": ('{"prompt": "p", "chosen": "a"', "invalid JSON"),
    "not an object": (json.dumps(["p", "a", "b"]), "expected a JSON object, got list"),
    "identical": (json.dumps({**GOOD, "rejected": GOOD["chosen"]}), "identical"),
    "null": (json.dumps({**GOOD, "prompt": None}), "'prompt' must be a string, got NoneType"),
}


def _write(path, *lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return str(path)


def test_read_preferences_fixture_keeps_metadata_and_ignores_blank_lines():
    records = read_preference_jsonl(os.path.join(FIXTURES, "preferences.jsonl"))
    assert [r.metadata["id"] for r in records] == [0, 1, 2]
    first = records[0]
    assert first == PreferenceRecord(
        "The movie was", " wonderful, I loved it.", " dull.", {"source": "fixture", "id": 0}
    )
    assert records[1].prompt == "Résumé of the plot:"
    assert records[1].chosen.endswith("☕.")


def test_read_demonstrations_and_prompts_fixtures():
    demos = read_demonstration_jsonl(os.path.join(FIXTURES, "demonstrations.jsonl"))
    assert demos[0] == DemonstrationRecord("The movie was", " great fun.", {"id": 0})
    assert demos[1].metadata == {"tags": ["a", "b"]}
    prompts = read_prompt_jsonl(os.path.join(FIXTURES, "prompts.jsonl"))
    assert prompts == [
        PromptRecord("The movie was", {}),
        PromptRecord("I think this film", {"label": 1}),
    ]


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_line_and_problem(tmp_path, case):
    bad_line, words = BAD_LINES[case]
    path = _write(tmp_path / "p.jsonl", json.dumps(GOOD), "", bad_line)  # the bad line is line 3
    with pytest.raises(BadRecordError) as info:
        read_preference_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert words in message
    assert "on_bad_record='skip'" in message  # says what to change
    assert info.value.line == 3 and info.value.path == path
    assert isinstance(info.value, ValueError)


def test_demonstration_and_prompt_kinds_check_their_own_fields(tmp_path):
    path = _write(tmp_path / "d.jsonl", json.dumps({"prompt": "p", "response": ""}))
    with pytest.raises(BadRecordError, match=r"d\.jsonl:1: field 'response' is empty"):
        read_demonstration_jsonl(path)
    path = _write(tmp_path / "q.jsonl", json.dumps({"text": "p"}))
    with pytest.raises(BadRecordError, match=r"q\.jsonl:1: missing field 'prompt'"):
        read_prompt_jsonl(path)


def test_skip_mode_counts_and_reports_once(caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.data"):
        records, report = read_jsonl_records(BAD_FILE, "preference", on_bad_record="skip")
    assert [r.metadata["id"] for r in records] == [0, 2, 1]  # lines 1, 9, 11
    assert report.num_records == 3
    assert report.num_skipped == 7
    assert report.skipped_lines == (2, 3, 4, 5, 6, 7, 8)  # line 10 is blank, not bad
    assert len(report.first_reasons) == 5
    warnings = [r for r in caplog.records if r.name == "rlhf_jax.data"]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "skipped 7 bad preference record(s) of 10" in text
    assert "lines 2, 3, 4, 5, 6, ..." in text
    assert BAD_FILE in text


def test_skip_mode_through_the_convenience_reader(caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.data"):
        assert len(read_preference_jsonl(BAD_FILE, on_bad_record="skip")) == 3
    assert sum(r.name == "rlhf_jax.data" for r in caplog.records) == 1


def test_error_mode_stops_at_first_bad_line_of_fixture():
    with pytest.raises(BadRecordError, match=r"preferences_bad\.jsonl:2: missing field 'chosen'"):
        read_preference_jsonl(BAD_FILE)


def test_no_report_when_nothing_is_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.data"):
        _, report = read_jsonl_records(
            os.path.join(FIXTURES, "preferences.jsonl"), "preference", on_bad_record="skip"
        )
    assert report.num_skipped == 0 and not caplog.records


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + b"\r\n")
    assert read_preference_jsonl(path) == [PreferenceRecord(**GOOD)]


def test_write_then_read_round_trips(tmp_path):
    records = read_preference_jsonl(os.path.join(FIXTURES, "preferences.jsonl"))
    path = tmp_path / "out.jsonl"
    assert write_jsonl(path, records) == 3
    assert read_preference_jsonl(path) == records
    assert "☕" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes


def test_hh_rlhf_conversion_matches_string_surgery():
    with open(os.path.join(FIXTURES, "hh_rlhf.jsonl"), encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    records = read_hh_rlhf_jsonl(os.path.join(FIXTURES, "hh_rlhf.jsonl"))
    for obj, record in zip(raw, records, strict=True):
        # Independent reference: split at the last "\n\nAssistant:" by hand.
        head, _, tail = obj["chosen"].rpartition("\n\nAssistant:")
        assert record.prompt == head + "\n\nAssistant:"
        assert record.chosen == tail
        assert record.rejected == obj["rejected"].rpartition("\n\nAssistant:")[2]
    assert records[0].prompt.count("\n\nHuman:") == 2  # the whole earlier dialogue stays
    assert records[0].chosen == " Paddington 2 is widely loved."
    assert records[1].metadata == {"split_hint": "x"}


def test_hh_rlhf_mismatched_dialogues_and_missing_tag():
    with pytest.raises(ValueError, match="do not share"):
        hh_rlhf_to_preference(
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
        )
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        hh_rlhf_to_preference({"chosen": "Human: a", "rejected": "Human: b"})
    with pytest.raises(ValueError, match="identical"):
        hh_rlhf_to_preference(
            {"chosen": "\n\nHuman: a\n\nAssistant: b"}
            | {"rejected": "\n\nHuman: a\n\nAssistant: b"}
        )


def test_hh_rlhf_gzip_file_with_bad_line_names_line(tmp_path):
    good = {"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "\n\nHuman: a\n\nAssistant: no"}
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "\n\nHuman: b\n\nAssistant: no"}
    path = str(tmp_path / "train.jsonl.gz")
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(BadRecordError, match=r"train\.jsonl\.gz:2: 'chosen' and 'rejected'"):
        read_hh_rlhf_jsonl(path)
    assert read_hh_rlhf_jsonl(path, on_bad_record="skip") == [
        PreferenceRecord("\n\nHuman: a\n\nAssistant:", " yes", " no")
    ]
