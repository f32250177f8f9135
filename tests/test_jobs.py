"""The settings record shared by the resumable offline jobs."""

import json

import pytest

from hf_distill.jobs import check_or_record_settings, read_appended_records


def test_settings_are_recorded_then_checked(tmp_path):
    path = str(tmp_path / "settings.json")
    check_or_record_settings(path, {"k": 64, "model": "m"}, "caches")
    assert json.loads((tmp_path / "settings.json").read_text()) == {"k": 64, "model": "m"}
    assert not (tmp_path / "settings.json.tmp").exists()  # written atomically
    check_or_record_settings(path, {"k": 64, "model": "m"}, "caches")  # same settings: resume
    with pytest.raises(ValueError, match=r"holds caches made with other settings \(\{'k': \(64, 16\)\}"):
        check_or_record_settings(path, {"k": 16, "model": "m"}, "caches")


def test_appended_records_skip_cut_and_rejected_lines(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n[1, 2]\n{"index": "x"}\n{"ind')  # a list, a bad value, a cut line
    with caplog.at_level("WARNING", logger="hf_distill.jobs"):
        rows = list(read_appended_records(str(path), lambda r: int(r["index"])))
    assert rows == [(1, 0), (2, 1)]
    assert caplog.text.count("Skipping unreadable line") == 3 and "line 5 of" in caplog.text
    assert list(read_appended_records(str(tmp_path / "missing.jsonl"), dict)) == []
